"""The restricted unpickler: data loads, code does not run."""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from implicit_meta.data import UnsafePickleError
from implicit_meta.data.safe_pickle import safe_load, safe_load_path, safe_loads

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


class SystemCall:
    """Runs a shell command when unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


class Eval:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return builtins.eval, ("__import__('os').getcwd()",)


class Popen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return subprocess.Popen, (["touch", str(self.marker)],)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_os_system_payload_is_refused_and_does_not_run(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(
        {"image_data": np.zeros(2), "x": SystemCall(f"touch {marker}")}, protocol=protocol
    )
    with pytest.raises(UnsafePickleError, match="system"):
        safe_loads(payload)
    assert not marker.exists()


def test_payload_is_real(tmp_path: Path) -> None:
    # Guard for the test above: the same bytes do run code under plain pickle.
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(SystemCall(f"touch {marker}")))
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        Eval(),
        [1, {"nested": (Eval(),)}],
        np.array([Eval()], dtype=object),
        collections.OrderedDict(a=Eval()),
    ],
    ids=["eval", "nested", "object-array", "ordered-dict"],
)
def test_other_callables_refused(payload: object) -> None:
    for protocol in (2, 4, 5):
        with pytest.raises(UnsafePickleError):
            safe_loads(pickle.dumps(payload, protocol=protocol))


def test_popen_refused(tmp_path: Path) -> None:
    marker = tmp_path / "popen"
    with pytest.raises(UnsafePickleError, match="Popen"):
        safe_loads(pickle.dumps(Popen(marker)))
    assert not marker.exists()


def test_hand_written_global_refused() -> None:
    # Protocol-0 opcodes naming builtins.getattr directly (no class needed to craft it).
    payload = b"cbuiltins\ngetattr\n(cbuiltins\nobject\nV__subclasses__\ntR."
    with pytest.raises(UnsafePickleError, match="getattr"):
        safe_loads(payload)


def test_persistent_id_refused() -> None:
    class Persisting(pickle.Pickler):
        def persistent_id(self, obj: object) -> str | None:
            return "ref" if obj == "secret" else None

    buffer = io.BytesIO()
    Persisting(buffer).dump(["secret"])
    with pytest.raises(UnsafePickleError, match="persistent"):
        safe_loads(buffer.getvalue())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_data_round_trips(protocol: int) -> None:
    value = {
        "image_data": np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3),
        "floats": np.linspace(0, 1, 7, dtype=np.float32)[::2],  # non-contiguous
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "class_dict": {"n01": [0, 1], "n02": [np.int64(1)]},
        "scalars": (np.float64(1.5), np.int32(-3), 7, 2.5, 1 + 2j, True, None),
        "text": ("abc", b"\x00\xff", bytearray(b"xy")),
        "sets": ({1, 2}, frozenset({"a"})),
        "ordered": collections.OrderedDict(z=1, a=2),
    }
    loaded = safe_loads(pickle.dumps(value, protocol=protocol))
    assert loaded.keys() == value.keys()
    for key in ("image_data", "floats", "fortran"):
        assert loaded[key].dtype == value[key].dtype
        np.testing.assert_array_equal(loaded[key], value[key])
    assert loaded["class_dict"] == value["class_dict"]
    assert loaded["scalars"] == value["scalars"]
    assert loaded["text"] == value["text"]
    assert loaded["sets"] == value["sets"]
    assert list(loaded["ordered"].items()) == [("z", 1), ("a", 2)]


def test_python2_style_numpy_pickle() -> None:
    # Pickles written by numpy 1.x name numpy.core.multiarray (no underscore).
    data = pickle.dumps(np.arange(4, dtype=np.int64), protocol=2)
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != data
    np.testing.assert_array_equal(safe_loads(legacy), np.arange(4))


def test_safe_load_file_and_path(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"a": np.ones(3)}))
    with open(path, "rb") as handle:
        np.testing.assert_array_equal(safe_load(handle)["a"], np.ones(3))
    np.testing.assert_array_equal(safe_load_path(path)["a"], np.ones(3))
    path.write_bytes(pickle.dumps(SystemCall("true")))
    with pytest.raises(pickle.UnpicklingError):
        safe_load_path(path)
