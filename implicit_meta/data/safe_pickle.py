"""A restricted unpickler for data files: plain containers, strings, numbers and numpy arrays.

``pickle.load`` on a downloaded file runs whatever callable the file names (``os.system`` via
``__reduce__`` is the classic). Pickle can only call callables it first looks up with
``find_class``, so refusing every global except the few that numpy needs to rebuild arrays makes
a crafted file fail with :class:`UnsafePickleError` before anything runs.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "safe_load", "safe_load_path", "safe_loads"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global that the restricted unpickler does not admit.

    Example:
        >>> issubclass(UnsafePickleError, pickle.UnpicklingError)
        True
    """


def _numpy_globals() -> dict[tuple[str, str], object]:
    """Map the module/name pairs numpy writes into pickles to the objects they denote.

    The objects are taken from numpy's own ``__reduce__`` output rather than imported by name, so
    the table is right for numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) alike, and pickles
    written by either version load under both.
    """
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.empty(1).__reduce_ex__(5)[0]
    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray}
    table[("numpy", "dtype")] = np.dtype
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


def _builtin_globals() -> dict[tuple[str, str], object]:
    """Containers and number types that pickle can only express through a global."""
    table: dict[tuple[str, str], object] = {}
    # Protocols 0-2 spell the builtins module the Python 2 way.
    for module in ("builtins", "__builtin__"):
        for name, obj in (
            ("set", set),
            ("frozenset", frozenset),
            ("bytearray", bytearray),
            ("complex", complex),
        ):
            table[(module, name)] = obj
    table[("collections", "OrderedDict")] = collections.OrderedDict
    # Protocols 0-2 store bytes (including numpy's array buffers) as _codecs.encode(str, codec);
    # it only converts text to bytes, and torch's weights-only unpickler admits it too.
    table[("_codecs", "encode")] = __import__("_codecs").encode
    return table


_ALLOWED: dict[tuple[str, str], object] = {**_builtin_globals(), **_numpy_globals()}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only plain containers, strings, numbers and numpy arrays.

    Dicts, lists, tuples, strings, bytes, ints, floats, booleans and ``None`` need no globals.
    The admitted globals are ``set``, ``frozenset``, ``bytearray``, ``complex``,
    ``collections.OrderedDict``, ``_codecs.encode`` and numpy's ``ndarray``, ``dtype``,
    ``_reconstruct``, ``scalar`` and ``_frombuffer``. Every other global raises
    :class:`UnsafePickleError`, and so does any persistent id.

    Example:
        >>> data = pickle.dumps({"x": np.arange(3)})
        >>> RestrictedUnpickler(io.BytesIO(data)).load()["x"].tolist()
        [0, 1, 2]
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return the admitted global ``module.name``.

        Args:
            module: Module name written in the pickle.
            name: Attribute name written in the pickle.

        Returns:
            The admitted object.

        Raises:
            UnsafePickleError: If ``module.name`` is not admitted.
        """
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name!s}: only plain containers, strings, "
                "numbers and numpy arrays may appear in a data pickle"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids, which would hand control to application code.

        Args:
            pid: The persistent id found in the pickle.

        Returns:
            Never returns.

        Raises:
            UnsafePickleError: Always.
        """
        raise UnsafePickleError("refusing persistent id in a data pickle")


def safe_load(file: IO[bytes]) -> Any:
    """Unpickle ``file`` with :class:`RestrictedUnpickler`.

    ``encoding="latin1"`` lets Python 2 pickles of numpy arrays load (their buffers are ``str``).

    Args:
        file: Binary file object positioned at the start of the pickle.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: If the pickle references a global that is not admitted.
        pickle.UnpicklingError: If the data are not a valid pickle.

    Example:
        >>> safe_load(io.BytesIO(pickle.dumps([1, "a", 2.0])))
        [1, 'a', 2.0]
    """
    return RestrictedUnpickler(file, encoding="latin1").load()


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    Args:
        data: The pickle bytes.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: If the pickle references a global that is not admitted.

    Example:
        >>> safe_loads(pickle.dumps({"a": (1, 2)}))
        {'a': (1, 2)}
    """
    return safe_load(io.BytesIO(data))


def safe_load_path(path: str | os.PathLike[str]) -> Any:
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler`.

    Args:
        path: Path of the pickle file.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: If the pickle references a global that is not admitted.
        OSError: If the file cannot be read.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        ...     _ = f.write(pickle.dumps({"n": 1}))
        >>> safe_load_path(f.name)
        {'n': 1}
    """
    with open(path, "rb") as handle:
        return safe_load(handle)
