"""``python -m implicit_meta``: the same command line as ``implicit-meta``."""

import os
import sys
from collections.abc import Callable, Sequence

from implicit_meta.cli import main

if __name__ == "__main__":
    entry: Callable[[Sequence[str] | None], int | None] = main
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # a torchrun worker
        from torch.distributed.elastic.multiprocessing.errors import record

        # record() writes an uncaught exception to the file torchrun's failure summary reads,
        # so the summary names the exception and its traceback instead of "error_file: <N/A>"
        # (the rank's own traceback is otherwise buried above the summary).
        entry = record(main)
    sys.exit(entry(None))  # None: sys.argv[1:]
