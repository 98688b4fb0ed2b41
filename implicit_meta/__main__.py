"""``python -m implicit_meta``: the same command line as ``implicit-meta``."""

import sys

from implicit_meta.cli import main

if __name__ == "__main__":
    sys.exit(main())
