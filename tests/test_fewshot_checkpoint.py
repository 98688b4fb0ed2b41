from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from implicit_meta.fewshot import checkpoint as ckpt
from implicit_meta.fewshot.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    decode_json_tensor,
    encode_json_tensor,
    load_checkpoint,
    save_checkpoint,
)


def _state(step: int) -> dict[str, Any]:
    streams = {
        "sampler": encode_json_tensor({}),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": [],
    }
    return {
        "format": CHECKPOINT_FORMAT,
        "config": {"ways": 5, "root": None, "reg": 1.0},
        "image_shape": [1, 28, 28],
        "step": step,
        "model": {"w": torch.full((64, 64), float(step))},
        "outer_optimizer": {"state": {}, "param_groups": []},
        "lr_scheduler": {"last_epoch": step},
        "best": {},
        **streams,
        "world_size": 1,
        "ranks": [streams],
        "versions": {"implicit_meta": "0.1.0", "torch": str(torch.__version__)},
    }


def test_json_tensor_round_trip_of_a_numpy_generator_state() -> None:
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(123))
    rng.random(5)
    state = {"seed": 1, "bit_generator": rng.bit_generator.state}
    tensor = encode_json_tensor(state)
    assert tensor.dtype == torch.uint8 and tensor.dim() == 1
    restored = np.random.Generator(np.random.PCG64())
    restored.bit_generator.state = decode_json_tensor(tensor)["bit_generator"]
    assert restored.random() == rng.random()
    with pytest.raises(CheckpointError):
        decode_json_tensor(torch.tensor([255, 0], dtype=torch.uint8))


def test_save_then_load_with_weights_only(tmp_path: Path) -> None:
    path = save_checkpoint(_state(3), tmp_path / "sub" / "checkpoint.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and torch.equal(raw["model"]["w"], torch.full((64, 64), 3.0))
    assert load_checkpoint(path)["config"] == {"ways": 5, "root": None, "reg": 1.0}
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: it is not a file torch\.save"):
        load_checkpoint(tmp_path / "garbage.pt")
    # A zip archive torch cannot read (a damaged checkpoint): one line, no torch advice.
    with zipfile.ZipFile(tmp_path / "torn.pt", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as error:
        load_checkpoint(tmp_path / "torn.pt")
    assert "\n" not in str(error.value) and "weights_only=False" not in str(error.value)
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({**_state(1), "format": "v0"}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an implicit-meta few-shot checkpoint format"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_load_refuses_the_first_format_and_says_how_to_go_on(tmp_path: Path) -> None:
    """A v1 file (settings stored twice: config and the meta-optimizer's) is refused."""
    v1 = {
        "format": "implicit-meta/fewshot-checkpoint/v1",
        "config": {"ways": 5, "cg_steps": None},
        "image_shape": [1, 28, 28],
        "step": 3,
        "model": {"w": torch.zeros(2)},
        "meta": {"outer_optimizer": {}, "settings": {"adjoint": {"cg_steps": 0}}},
        "versions": {"implicit_meta": "0.0.9", "torch": str(torch.__version__)},
    }
    torch.save(v1, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "checkpoint.pt")
    message = str(error.value)
    assert "'implicit-meta/fewshot-checkpoint/v1', written by implicit-meta 0.0.9" in message
    assert CHECKPOINT_FORMAT in message
    assert "retrain with this version, or load or resume it with implicit-meta==0.0.9" in message


def test_failure_while_writing_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(_state(1), tmp_path / "checkpoint.pt")
    real_save = torch.save

    def torn_save(obj: object, handle: Any) -> None:
        real_save(obj, handle)
        handle.seek(100)
        handle.truncate()  # a half-written file, then the "disk full"
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_keyboard_interrupt_before_replace_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(_state(1), tmp_path / "checkpoint.pt")

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_process_killed_mid_save_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    """A real SIGKILL after the new data is on disk but before the rename."""
    path = tmp_path / "checkpoint.pt"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from implicit_meta.fewshot import checkpoint as ckpt
        from implicit_meta.fewshot.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
        def state(step):
            return {{"format": CHECKPOINT_FORMAT, "config": {{}}, "step": step,
                     "model": {{"w": torch.full((256, 256), float(step))}}, "meta": {{}}}}
        save_checkpoint(state(1), {str(path)!r})
        ckpt.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        save_checkpoint(state(2), {str(path)!r})
        print("not reached")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert "not reached" not in proc.stdout
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(256, 256))
    # The orphaned temp file holds the complete new state; the trainer removes such leftovers.
    leftovers = [p for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")
