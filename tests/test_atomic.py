"""The atomic-write helper: the target is replaced whole or not at all, and nothing is left over."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from implicit_meta import _atomic
from implicit_meta._atomic import atomic_write, atomic_write_text


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_replaces_the_target_and_leaves_only_it(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as handle:
        handle.write(b"new content")
    assert target.read_bytes() == b"new content"
    assert _names(tmp_path) == ["data.bin"]


def test_creates_a_missing_target(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "fresh.bin") as handle:
        handle.write(b"x")
    assert (tmp_path / "fresh.bin").read_bytes() == b"x"


def test_temporary_file_sits_next_to_the_target(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "checkpoint.pt"
    with atomic_write(target) as handle:
        handle.write(b"partial")
        handle.flush()
        (tmp,) = folder.iterdir()  # a rename is only atomic within one folder's file system
        assert tmp.name.startswith(".checkpoint.pt.") and tmp.name.endswith(".tmp")
        assert tmp.read_bytes() == b"partial"
        assert not target.exists()  # nothing is visible under the real name before the end
    assert _names(folder) == ["checkpoint.pt"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_old_file(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_write(target) as handle:
        handle.write(b"half of the ne")
        handle.flush()
        raise error
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["data.bin"]


def test_failed_rename_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def refuse(src: object, dst: object) -> None:
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"), atomic_write(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["data.bin"]


def test_drawn_names_that_clash_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two writers drawing the same random name must not share one temporary file.
    draws: Iterator[str] = iter(["a" * 16, "a" * 16, "b" * 16])
    monkeypatch.setattr(_atomic.secrets, "token_hex", lambda n: next(draws))
    target = tmp_path / "data.bin"
    with atomic_write(target) as first, atomic_write(target) as second:
        first.write(b"first")
        second.write(b"second")
        assert _names(tmp_path) == [f".data.bin.{'a' * 16}.tmp", f".data.bin.{'b' * 16}.tmp"]
    assert target.read_bytes() == b"first"  # the outer block ends last
    assert _names(tmp_path) == ["data.bin"]


def test_concurrent_writers_never_tear_the_file(tmp_path: Path) -> None:
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    errors: list[BaseException] = []

    def write(payload: bytes) -> None:
        try:
            for _ in range(5):
                with atomic_write(target) as handle:
                    handle.write(payload)
        except BaseException as error:  # reported below; a thread's error is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert target.read_bytes() in payloads
    assert _names(tmp_path) == ["shared.bin"]


def test_permissions_are_those_open_gives(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    with atomic_write(tmp_path / "data.bin") as handle:
        handle.write(b"x")
    mode = stat.S_IMODE((tmp_path / "data.bin").stat().st_mode)
    assert mode == stat.S_IMODE(reference.stat().st_mode)


def test_text_is_written_as_given(tmp_path: Path) -> None:
    target = tmp_path / "log.jsonl"
    atomic_write_text(target, "één\nline\r\n")
    assert target.read_bytes() == "één\nline\r\n".encode()
    assert _names(tmp_path) == ["log.jsonl"]
