import sys

from tokenmill.cli.main import main

sys.exit(main())
