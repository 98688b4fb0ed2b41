"""Atomic file writes: a reader sees the old file or the complete new one, never a torn write.

Checkpoints, cache files, ``metrics.jsonl`` rewrites and ``curves.png`` all go through
:func:`atomic_write`: the content is written to a temporary file in the destination folder
(a rename is only atomic within one file system), flushed and fsynced, then moved over the
destination with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced so the
rename itself survives a power cut. If anything fails before the rename, the temporary file is
removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_text"]

_ATTEMPTS = 100
"""Names tried before giving up; a clash of two random 64-bit names is already improbable."""


def _create_temporary(target: Path) -> tuple[int, Path]:
    """Create and open a new, uniquely named temporary file next to ``target``.

    The name is ``.<target name>.<16 random hex digits>.tmp``: hidden, recognisable as a
    leftover of ``target`` (a killed process cannot clean up after itself), and distinct for
    every writer. ``O_EXCL`` makes creation fail rather than share a file when two processes
    (e.g. ``torchrun`` ranks) draw the same name. Mode ``0o666`` is filtered by the umask, so
    the final file gets the permissions ``open()`` would give it, unlike ``tempfile.mkstemp``'s
    owner-only ``0o600``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_ATTEMPTS):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(candidate, flags, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened on Windows, hence the guard.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary file whose content replaces ``path`` only when the block ends without error.

    Writers that stream their output (``torch.save``, ``np.savez``, ``Figure.savefig``) write to
    the yielded file object; on a clean exit it is flushed, fsynced, closed and renamed over
    ``path``. Any exception inside the block, ``KeyboardInterrupt`` included, removes the
    temporary file and propagates, leaving ``path`` untouched.

    Args:
        path: Destination file. Its folder must exist; it is not created here.

    Yields:
        A binary file object open for writing, in ``path``'s folder.

    Raises:
        OSError: If the temporary file cannot be created, written or renamed; ``path`` is then
            unchanged and no temporary file is left behind.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     target = pathlib.Path(folder) / "data.bin"
        ...     with atomic_write(target) as handle:
        ...         _ = handle.write(b"new")
        ...     print(target.read_bytes(), sorted(p.name for p in target.parent.iterdir()))
        b'new' ['data.bin']
    """
    target = Path(path)
    fd, tmp = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        # KeyboardInterrupt included: never leave a half-written temporary file behind.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    r"""Replace ``path`` with ``text`` atomically (see :func:`atomic_write`).

    Args:
        path: Destination file; its folder must exist.
        text: The whole new content.
        encoding: Text encoding. Newlines are written as given, on every platform.

    Raises:
        OSError: If writing fails; ``path`` is then unchanged.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     target = pathlib.Path(folder) / "log.txt"
        ...     atomic_write_text(target, "one\n")
        ...     target.read_text(encoding="utf-8")
        'one\n'
    """
    data = text.encode(encoding)
    with atomic_write(path) as handle:
        handle.write(data)
