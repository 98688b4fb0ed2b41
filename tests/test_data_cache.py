"""The on-disk array cache: location, atomic writes, failure tolerance."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from implicit_meta.data._cache import cache_dir, cached_arrays


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMPLICIT_META_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "implicit_meta"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "implicit_meta"
    monkeypatch.setenv("IMPLICIT_META_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_build_once_then_read(tmp_path: Path) -> None:
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"a": np.arange(5, dtype=np.uint8), "names": np.asarray(["x", "yy"])}

    first = cached_arrays("t.npz", build, directory=tmp_path)
    second = cached_arrays("t.npz", build, directory=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(second["a"], np.arange(5))
    assert second["names"].tolist() == ["x", "yy"] and first["a"].dtype == second["a"].dtype
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary file left over
    # Readable like any other file the user creates (not the 0600 of tempfile.mkstemp).
    reference = tmp_path.parent / f"{tmp_path.name}-reference"
    reference.write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "t.npz").stat().st_mode) == stat.S_IMODE(
        reference.stat().st_mode
    )
    cached_arrays("t.npz", build, directory=tmp_path, enabled=False)
    assert len(calls) == 2


def test_invalid_file_rebuilt(tmp_path: Path) -> None:
    cached_arrays("t.npz", lambda: {"a": np.zeros(2)}, directory=tmp_path)
    with pytest.warns(UserWarning, match="rebuilding"):
        out = cached_arrays(
            "t.npz", lambda: {"a": np.ones(3)}, directory=tmp_path, valid=lambda a: len(a["a"]) == 3
        )
    np.testing.assert_array_equal(out["a"], np.ones(3))
    np.testing.assert_array_equal(
        cached_arrays("t.npz", lambda: {"a": np.zeros(1)}, directory=tmp_path)["a"], np.ones(3)
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_cache_only_warns(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.warns(UserWarning, match="could not write"):
        out = cached_arrays("t.npz", lambda: {"a": np.ones(1)}, directory=locked)
    np.testing.assert_array_equal(out["a"], np.ones(1))


def test_cache_path_blocked_by_file_only_warns(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="could not write"):
        out = cached_arrays("t.npz", lambda: {"a": np.ones(1)}, directory=blocker)
    np.testing.assert_array_equal(out["a"], np.ones(1))
