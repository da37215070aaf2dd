"""``python -m gptevo``: the same command line as ``gptevo`` (gptevo/cli.py)."""
import sys

from gptevo.cli import main

if __name__ == "__main__":
    sys.exit(main())
