"""On-disk cache of preprocessed image arrays.

Decoding and resizing tens of thousands of images takes seconds (Omniglot) to minutes
(Mini-ImageNet from JPEGs), so the loaders store their uint8 result once as an uncompressed
``.npz`` and read it back on later runs. The cache is an optimisation only: a file that cannot be
written or read is reported with a warning and the data are rebuilt from the source.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from implicit_meta._atomic import atomic_write

__all__ = ["cache_dir", "cached_arrays", "fingerprint_files", "hash_bytes"]

CACHE_ENV = "IMPLICIT_META_CACHE"
"""Environment variable that overrides the cache folder."""

Arrays = dict[str, npt.NDArray[np.generic]]


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder that holds implicit-meta's data caches.

    The first of these wins: ``override``, ``$IMPLICIT_META_CACHE``,
    ``$XDG_CACHE_HOME/implicit_meta``, ``~/.cache/implicit_meta``. The folder is not created here.

    Args:
        override: Explicit folder, e.g. the ``cache_dir`` argument of a loader.

    Returns:
        The cache folder as an absolute path.

    Example:
        >>> cache_dir("/tmp/im-cache")
        PosixPath('/tmp/im-cache')
    """
    if override is not None:
        return Path(override).expanduser().absolute()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "implicit_meta").expanduser().absolute()


def hash_bytes(chunks: Iterable[bytes]) -> str:
    """Return the hex SHA-256 of the concatenation of ``chunks``.

    Args:
        chunks: Byte strings, hashed in order.

    Returns:
        The 64-character hex digest.

    Example:
        >>> hash_bytes([b"a", b"b"]) == hash_bytes([b"ab"])
        True
    """
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[Path], root: Path) -> str:
    r"""Fingerprint files by relative path, size and modification time.

    Hashing the content of tens of thousands of small images would cost about as much as the
    decoding the cache saves, so folders are keyed by ``stat`` data, as ``make`` does.

    Args:
        paths: Files to fingerprint; their order matters, so pass them sorted.
        root: Folder the recorded paths are made relative to.

    Returns:
        The hex SHA-256 of one ``relpath\tsize\tmtime_ns`` line per file.

    Raises:
        FileNotFoundError: If a file vanished while being listed.

    Example:
        >>> len(fingerprint_files([], Path(".")))
        64
    """
    lines = []
    for path in paths:
        stat = path.stat()
        lines.append(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n")
    return hash_bytes(line.encode("utf-8") for line in lines)


def _read(path: Path) -> Arrays | None:
    """Read a cache file, or return ``None`` (with a warning) if it is unusable."""
    try:
        # allow_pickle=False: a cache file must never be able to run code either.
        with np.load(path, allow_pickle=False) as npz:
            arrays: Arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        warnings.warn(f"ignoring unreadable cache file {path}: {err}", stacklevel=3)
        return None
    return arrays


def _write(path: Path, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Write ``arrays`` to ``path`` atomically; warn instead of failing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A reader (another process, or a run killed half-way) sees either no file or a
        # complete one, never a torn write.
        with atomic_write(path) as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
    except OSError as err:
        warnings.warn(f"could not write cache file {path}: {err}", stacklevel=3)


def cached_arrays(
    name: str,
    build: Callable[[], Arrays],
    *,
    directory: str | os.PathLike[str] | None = None,
    enabled: bool = True,
    valid: Callable[[Arrays], bool] | None = None,
) -> Arrays:
    """Return the arrays stored under ``name``, building and storing them on a miss.

    Args:
        name: File name inside the cache folder; it must encode everything the content depends
            on (source fingerprint, image size, preprocessing version).
        build: Computes the arrays on a cache miss. Arrays must not hold Python objects.
        directory: Cache folder override, see :func:`cache_dir`.
        enabled: If False, always build and never touch the disk.
        valid: Optional check of a cached file's arrays; a file that fails it is rebuilt and
            overwritten (guards against a file of the right name with the wrong content).

    Returns:
        Mapping from array name to array.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     arrays = cached_arrays("x.npz", lambda: {"a": np.arange(3)}, directory=d)
        >>> arrays["a"].tolist()
        [0, 1, 2]
    """
    if not enabled:
        return build()
    path = cache_dir(directory) / name
    if path.is_file():
        arrays = _read(path)
        if arrays is not None and (valid is None or valid(arrays)):
            return arrays
        if arrays is not None:
            warnings.warn(f"rebuilding invalid cache file {path}", stacklevel=2)
    arrays = build()
    _write(path, arrays)
    return arrays
