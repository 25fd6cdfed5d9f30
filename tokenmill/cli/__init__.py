"""The `tokenmill` command line: main.py holds the command table, one module per command, flags.py what they share."""
