"""Reproducible meta-training: same command, same bytes; kill, resume, same bytes; chunks too.

The kill tests run the trainer in a real child process and kill it with SIGKILL: between
checkpoints (from outside, while it trains), and inside a checkpoint write (the child kills
itself after writing half of the temporary file, or just before the atomic rename).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from implicit_meta.data import EpisodeSampler, FewShotDataset, Splits
from implicit_meta.fewshot import TrainConfig, train
from implicit_meta.fewshot.builders import build_lr_scheduler, build_meta_optimizer, build_model
from implicit_meta.fewshot.config import meta_lr_at
from implicit_meta.fewshot.device import available_cpus, configure_threads
from implicit_meta.fewshot.evaluation import episode_accuracies
from implicit_meta.fewshot.metrics import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore:I \\+ H/reg is not positive definite")

CONFIG = TrainConfig(
    backbone="conv4-8", ways=3, shots=1, queries=2, inner_steps=2, cg_steps=2, meta_batch=2,
    meta_steps=12, meta_lr=0.01, eval_episodes=5, val_episodes=3, val_every=4, threads=1,
    device="cpu", seed=3, log_every=1, checkpoint_every=3,
)  # fmt: skip

# The child process: builds the same synthetic splits, optionally arms a SIGKILL, trains.
CHILD = textwrap.dedent(
    """
    import io, os, signal, sys, time, json, warnings
    import torch
    warnings.simplefilter("ignore")
    from implicit_meta.data import FewShotDataset, Splits
    from implicit_meta.fewshot import TrainConfig, train
    from implicit_meta.fewshot import _run

    out, mode, resume, config = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 4, 1, 16, 16), generator=g, dtype=torch.uint8)
    names = tuple(f"c{i}" for i in range(12))
    data = FewShotDataset(images, names)
    meta_train, test, val = (data.select(range(a, a + 3 * n)) for a, n in ((0, 2), (6, 1), (9, 1)))
    splits = Splits(train=meta_train, val=val, test=test)

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "slow":  # sleeping changes no arithmetic; it gives the outside killer time
        step = _run.meta_train_step
        def slow(*args):
            time.sleep(0.15)
            return step(*args)
        _run.meta_train_step = slow
    if mode.startswith("torn-"):  # die halfway through writing the n-th checkpoint's temp file
        target, calls, save = int(mode.split("-")[1]), [0], torch.save
        def torn(obj, handle, *args, **kwargs):
            calls[0] += 1
            if calls[0] != target:
                return save(obj, handle, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            kill()
        torch.save = torn
    if mode.startswith("rename-"):  # die just before the atomic rename of the n-th checkpoint
        target, calls, replace = int(mode.split("-")[1]), [0], os.replace
        def dying(src, dst):
            if str(dst).endswith(".pt"):
                calls[0] += 1
                if calls[0] == target:
                    kill()
            return replace(src, dst)
        os.replace = dying
    config = TrainConfig.from_dict(json.loads(config))
    train(config, out, resume=resume, progress=False, splits=splits)
    """
)


def _child(
    tmp_path: Path, out: Path, mode: str = "plain", *, resume: bool = False
) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        str(script),
        str(out),
        mode,
        "1" if resume else "0",
        json.dumps(CONFIG.to_dict()),
    ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen[str]) -> int:
    _, err = process.communicate(timeout=240)
    assert process.returncode in (0, -signal.SIGKILL), err[-3000:]
    return process.returncode


def _splits() -> Splits[FewShotDataset]:
    # Same data as the child's.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 4, 1, 16, 16), generator=g, dtype=torch.uint8)
    data = FewShotDataset(images, tuple(f"c{i}" for i in range(12)))
    return Splits(
        train=data.select(range(6)), val=data.select(range(9, 12)), test=data.select(range(6, 9))
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run in a child process: the bytes every other run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    assert _finish(_child(tmp, out)) == 0
    return out


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_same_command_gives_the_same_checkpoint_bytes(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "again"
    assert _finish(_child(tmp_path, out)) == 0
    for name in ("checkpoint.pt", "best.pt"):
        assert _bytes(out / name) == _bytes(reference / name), name
    ours, theirs = (json.loads((d / "evaluation.json").read_text()) for d in (out, reference))
    assert Path(ours.pop("checkpoint")).name == Path(theirs.pop("checkpoint")).name
    assert ours == theirs


def _killed_and_resumed(tmp_path: Path, mode: str, reference: Path) -> None:
    out = tmp_path / "run"
    first = _child(tmp_path, out, mode)
    if mode == "slow":
        # Kill from outside once a few steps are logged, so a checkpoint exists and some steps
        # after it are lost.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            steps = [r.get("step", 0) for r in read_metrics(out / "metrics.jsonl")]
            if steps and max(steps) >= 7:
                break
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    assert _finish(first) == -signal.SIGKILL
    assert (out / "checkpoint.pt").is_file()
    assert not (out / "evaluation.json").exists()
    assert _finish(_child(tmp_path, out, resume=True)) == 0
    for name in ("checkpoint.pt", "best.pt"):
        assert _bytes(out / name) == _bytes(reference / name), name
    assert not list(out.glob(".*.tmp")), "a torn temporary file was left behind"
    records = [
        {k: v for k, v in r.items() if k != "elapsed"} for r in read_metrics(out / "metrics.jsonl")
    ]
    expected = [
        {k: v for k, v in r.items() if k != "elapsed"}
        for r in read_metrics(reference / "metrics.jsonl")
    ]
    assert records == expected


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(
    tmp_path: Path, reference: Path
) -> None:
    _killed_and_resumed(tmp_path, "slow", reference)


@pytest.mark.parametrize("mode", ["torn-3", "rename-4"])
def test_sigkill_inside_a_checkpoint_write_then_resume_is_bit_identical(
    tmp_path: Path, reference: Path, mode: str
) -> None:
    # The writes are best.pt at step 0, checkpoint.pt at step 3, best.pt or checkpoint.pt
    # later: "torn-3" dies halfway through the third file, "rename-4" before the fourth rename.
    _killed_and_resumed(tmp_path, mode, reference)


def _state(path: Path) -> dict[str, Any]:
    state = torch.load(path, weights_only=True)
    state["config"] = {k: v for k, v in state["config"].items() if k != "time_budget"}
    return dict(state)


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_a_run_in_time_budget_chunks_equals_one_uninterrupted_run(tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    try:
        splits = _splits()
        whole = train(CONFIG, tmp_path / "whole", progress=False, splits=splits)
        chunk = CONFIG.replace(time_budget=1e-9)  # every call stops after one meta-step
        out = tmp_path / "chunks"
        result = train(chunk, out, progress=False, splits=splits)
        calls = 1
        assert result.stopped_by == "time_budget" and result.step == 1
        assert result.evaluation is None and not (out / "evaluation.json").exists()
        while result.stopped_by == "time_budget":
            result = train(chunk, out, resume=True, progress=False, splits=splits)
            calls += 1
        assert calls == CONFIG.meta_steps and result.step == CONFIG.meta_steps
    finally:
        torch.set_num_threads(previous)
    for name in ("checkpoint.pt", "best.pt"):
        _assert_same(_state(out / name), _state(tmp_path / "whole" / name), name)
    assert whole.evaluation is not None and result.evaluation == whole.evaluation
    assert result.baseline == whole.baseline


def test_the_schedule_follows_the_step_and_survives_resume(tmp_path: Path) -> None:
    config = CONFIG.replace(val_episodes=0, eval_episodes=0)
    model = build_model(config, (1, 16, 16))
    meta = build_meta_optimizer(model, config)
    scheduler = build_lr_scheduler(meta.outer_optimizer, config)
    for step in range(config.meta_steps + 1):
        lr = meta.outer_optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(meta_lr_at(config, step), rel=1e-9, abs=1e-15)
        meta.outer_optimizer.step()
        scheduler.step()
    previous = torch.get_num_threads()
    try:
        train(config.replace(meta_steps=5), tmp_path / "a", progress=False, splits=_splits())
        # Stopped before its end by a clean stop: the scheduler saved is at step 5.
        state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
        assert state["lr_scheduler"]["last_epoch"] == 5
        assert "elapsed" not in state  # nothing in a checkpoint follows the clock
    finally:
        torch.set_num_threads(previous)


def test_resume_refuses_a_longer_cosine_and_says_what_to_do(tmp_path: Path) -> None:
    config = CONFIG.replace(meta_steps=2, val_episodes=0, eval_episodes=0)
    previous = torch.get_num_threads()
    try:
        train(config, tmp_path / "run", progress=False, splits=_splits())
        before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
        with pytest.raises(ValueError, match=r"cosine schedule.*--lr-schedule constant"):
            train(config.replace(meta_steps=4), tmp_path / "run", resume=True, splits=_splits())
        assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
        constant = config.replace(lr_schedule="constant")
        train(constant, tmp_path / "c", progress=False, splits=_splits())
        result = train(
            constant.replace(meta_steps=4),
            tmp_path / "c",
            resume=True,
            progress=False,
            splits=_splits(),
        )
        assert result.step == 4
    finally:
        torch.set_num_threads(previous)


def test_default_thread_count_ignores_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
        assert configure_threads(0) == available_cpus()
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert configure_threads(0) == available_cpus()
    finally:
        torch.set_num_threads(previous)


def test_the_defaults_are_a_fixed_number_of_steps_without_a_clock() -> None:
    defaults = TrainConfig()
    assert defaults.time_budget == 0 and defaults.threads == 0 and defaults.meta_steps > 0
    assert defaults.val_episodes > 0 and defaults.val_classes > 0


def test_baseline_is_the_untrained_model_on_the_same_episodes(reference: Path) -> None:
    summary = json.loads((reference / "evaluation.json").read_text())
    splits = _splits()
    torch.manual_seed(CONFIG.seed)
    untrained = build_model(CONFIG, (1, 16, 16))
    sampler = EpisodeSampler(splits.test, 3, 1, 2, CONFIG.seed, torch.device("cpu"))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        values = episode_accuracies(build_meta_optimizer(untrained, CONFIG), sampler, 5)
    finally:
        torch.set_num_threads(previous)
    assert summary["baseline"]["accuracy"] == pytest.approx(sum(values) / 5, abs=1e-12)
    assert summary["gain"] == pytest.approx(summary["accuracy"] - summary["baseline"]["accuracy"])


def test_best_checkpoint_is_the_best_validation_step(reference: Path) -> None:
    validations = [r for r in read_metrics(reference / "metrics.jsonl") if "val_accuracy" in r]
    # Validated at the start, every val_every steps and at the end.
    assert [r["step"] for r in validations] == [0, 4, 8, 12]
    best = max(validations, key=lambda r: r["val_accuracy"])  # the first of equal maxima
    state = torch.load(reference / "best.pt", weights_only=True)
    assert state["step"] == best["step"] and state["best"]["step"] == best["step"]
    summary = json.loads((reference / "evaluation.json").read_text())
    assert summary["step"] == best["step"]
    assert Path(summary["checkpoint"]).name == "best.pt"


def test_gitignore_covers_the_readme_virtualenv() -> None:
    lines = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().splitlines()
    assert ".venv/" in lines
