from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from implicit_meta import cli
from implicit_meta.fewshot import _run
from implicit_meta.fewshot.checkpoint import decode_json_tensor
from implicit_meta.functional import CGStatus

pytestmark = pytest.mark.filterwarnings("ignore:I \\+ H/reg is not positive definite")

TINY = [
    "--backbone", "conv4-8", "--ways", "3", "--shots", "1", "--queries", "2",
    "--inner-steps", "2", "--cg-steps", "2", "--meta-batch", "2", "--threads", "1",
    "--log-every", "1", "--checkpoint-every", "2", "--eval-episodes", "0", "--no-progress",
    "--val-episodes", "0",
    # The bit-exact resume tests below change --meta-steps between the halves, which reshapes a
    # cosine schedule, and the default time budget makes its rate depend on the clock; the
    # cosine schedule's own resume test is test_cosine_schedule_resumes_exactly.
    "--lr-schedule", "constant",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def _train(out: Path, *extra: str) -> int:
    return cli.main(["train", *TINY, "--out", str(out), *extra])


def _load(out: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(out / "checkpoint.pt", weights_only=True)
    return state


def _records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in lines]


def _assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    opt_a, opt_b = a["outer_optimizer"]["state"], b["outer_optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[index][key], opt_b[index][key]), (index, key)
    assert decode_json_tensor(a["sampler"]) == decode_json_tensor(b["sampler"])
    assert torch.equal(a["torch_rng"], b["torch_rng"])


def test_smoke_train_writes_metrics_checkpoint_and_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(out, "--meta-steps", "3", "--eval-episodes", "6") == 0
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        shares = {f"status_share.{status.name}" for status in CGStatus}
        assert set(record) == {
            "step", "outer_loss", "query_accuracy", "inner_loss", "stationarity", "cg_residual",
            "relative_stationarity", "relative_cg_residual", "meta_lr", *shares,
        }  # fmt: skip
        assert 0.0 <= record["query_accuracy"] <= 1.0 and record["outer_loss"] > 0
        # The relative values and the shares, each judgeable without a reference.
        assert sum(record[k] for k in shares) == pytest.approx(1.0)
        assert record["status_share.FIRST_ORDER"] == 0.0  # CG ran (2 steps)
        assert 0.0 < record["relative_stationarity"] < 1.0  # 2 SGD steps made progress
        assert 0.0 <= record["relative_cg_residual"] < 1.0
    state = _load(out)
    assert state["step"] == 3 and state["config"]["ways"] == 3
    assert all(isinstance(v, str | int | float | type(None)) for v in state["config"].values())
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["episodes"] == 6 and 0.0 <= evaluation["accuracy"] <= 1.0
    stdout = capsys.readouterr().out
    assert "meta-trained 3 steps" in stdout and "3-way 1-shot accuracy" in stdout


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, "--meta-steps", "4") == 0
    assert _train(split, "--meta-steps", "2") == 0
    first_half = _load(split)
    assert _train(split, "--meta-steps", "4", "--resume") == 0
    resumed = _load(split)
    _assert_same_state(_load(straight), resumed)
    assert _records(straight) == _records(split)
    # The comparison is sensitive: the half-way state differs from the final one.
    assert not torch.equal(first_half["model"]["head.weight"], resumed["model"]["head.weight"])


def test_resume_after_an_interruption_between_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert _train(straight, "--meta-steps", "6") == 0
    real_step = _run.meta_train_step
    calls = {"n": 0}

    def crash_on_fourth(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(_run, "meta_train_step", crash_on_fourth)
    assert _train(crashed, "--meta-steps", "6") == 130
    monkeypatch.undo()
    assert _load(crashed)["step"] == 2  # the last periodic checkpoint
    assert [r["step"] for r in _records(crashed)] == [1, 2, 3]  # step 3 was logged, then lost
    assert _train(crashed, "--resume") == 0
    _assert_same_state(_load(straight), _load(crashed))
    assert _records(straight) == _records(crashed)


def test_resume_with_compile_inner_compiles_the_inner_objective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--compile-inner may change on resume, and it takes effect.

    The checkpoint stores the settings once, in its config; restoring loads the outer
    optimizer's state alone, so the resumed run's meta-optimizer has the requested settings.
    """
    out = tmp_path / "run"
    assert _train(out, "--meta-steps", "2", "--task-strategy", "loop") == 0
    assert _load(out)["config"]["compile_inner"] is False
    compiled: list[object] = []

    def counting_compile(function: Any, *args: Any, **kwargs: Any) -> Any:
        compiled.append(function)
        return function  # the eager function: the same numbers, no compilation time

    monkeypatch.setattr(torch, "compile", counting_compile)
    code = _train(out, "--meta-steps", "4", "--task-strategy", "loop", "--resume",
                  "--compile-inner")  # fmt: skip
    assert code == 0
    # Every inner solve of the two resumed steps (2 tasks each) went through torch.compile.
    assert len(compiled) == 4
    state = _load(out)
    assert state["step"] == 4 and state["config"]["compile_inner"] is True
    assert "meta" not in state  # the settings are stored once, as the config


def test_resume_rejects_changed_settings_and_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(out, "--meta-steps", "1") == 0
    capsys.readouterr()
    assert _train(out, "--meta-steps", "2", "--resume", "--ways", "2") == 2
    assert "cannot resume with a different ways" in capsys.readouterr().err
    assert _train(out, "--meta-steps", "2") == 2  # would overwrite without --resume
    assert "exists" in capsys.readouterr().err
    assert _train(tmp_path / "empty", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_resume_keeps_stored_settings_for_flags_not_given(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(out, "--meta-steps", "1", "--seed", "7") == 0
    assert cli.main(["train", "--out", str(out), "--resume", "--meta-steps", "2",
                     "--no-progress"]) == 0  # fmt: skip
    config = _load(out)["config"]
    assert config["seed"] == 7 and config["ways"] == 3 and config["meta_steps"] == 2


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(out, "--meta-steps", "1") == 0
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"partial")
    assert _train(out, "--meta-steps", "2", "--resume") == 0
    assert not stale.exists()


def test_time_budget_stops_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(out, "--meta-steps", "1000", "--time-budget", "1e-9") == 0
    assert _load(out)["step"] == 1  # every call makes at least one meta-step
    printed = capsys.readouterr().out
    assert "stopped by time_budget" in printed
    assert f"continue with: implicit-meta train --out {out} --resume" in printed


def test_device_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _train(tmp_path / "run", "--meta-steps", "2", "--device", "cuda")
    if torch.cuda.is_available():
        assert code == 0
        assert _load(tmp_path / "run")["step"] == 2
    else:
        assert code == 2
        err = capsys.readouterr().err
        assert "--device cuda was requested but CUDA is not available" in err
        assert "Traceback" not in err
        assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_restores_the_torch_random_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models with dropout draw from torch's generator; a resumed run must continue its stream."""
    real_step = _run.meta_train_step

    def step_with_noise(meta: Any, *args: Any) -> Any:
        stats = real_step(meta, *args)
        with torch.no_grad():  # stands in for dropout: the update depends on torch's stream
            meta.model.head.bias.add_(1e-3 * torch.randn_like(meta.model.head.bias))
        return stats

    monkeypatch.setattr(_run, "meta_train_step", step_with_noise)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, "--meta-steps", "4") == 0
    assert _train(split, "--meta-steps", "2") == 0
    torch.manual_seed(12345)  # whatever happens in between must not matter
    assert _train(split, "--meta-steps", "4", "--resume") == 0
    _assert_same_state(_load(straight), _load(split))


def test_cosine_schedule_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted and resumed, a cosine run without a time budget matches an uninterrupted one."""
    cosine = (
        "--lr-schedule",
        "cosine",
        "--time-budget",
        "0",
        "--meta-steps",
        "4",
        "--meta-lr",
        "0.01",
    )
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert _train(straight, *cosine) == 0
    rates = [r["meta_lr"] for r in _records(straight)]
    # The rate of step k is 0.01 * (1 + cos(pi * (k - 1) / 4)) / 2.
    assert rates == pytest.approx([0.01, 0.0085355339, 0.005, 0.0014644661])
    real_step = _run.meta_train_step
    calls = {"n": 0}

    def crash_on_third(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(_run, "meta_train_step", crash_on_third)
    assert _train(crashed, *cosine) == 130
    monkeypatch.undo()
    assert _load(crashed)["step"] == 2
    assert _train(crashed, *cosine, "--resume") == 0
    _assert_same_state(_load(straight), _load(crashed))
    assert _records(straight) == _records(crashed)


def test_vmapped_and_looped_meta_batches_train_the_same_model(tmp_path: Path) -> None:
    """--task-strategy changes how the tasks are solved, not what the run computes."""
    assert _train(tmp_path / "loop", "--meta-steps", "3", "--task-strategy", "loop") == 0
    assert _train(tmp_path / "vmap", "--meta-steps", "3", "--task-strategy", "vmap") == 0
    loop, vmap = _load(tmp_path / "loop"), _load(tmp_path / "vmap")
    assert loop["config"]["task_strategy"] == "loop"
    for name, value in loop["model"].items():
        if name.endswith(".bias") and name.startswith("features.") and value.dim() == 1:
            conv = int(name.split(".")[1])
            if conv % 4 == 0:
                # A convolution's bias right before BatchNorm has a zero meta-gradient; Adam
                # turns its rounding noise (which differs between the strategies) into full
                # steps of either sign, so it is not comparable.
                continue
        torch.testing.assert_close(vmap["model"][name], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(_records(tmp_path / "loop"), _records(tmp_path / "vmap"), strict=True):
        assert b["query_accuracy"] == pytest.approx(a["query_accuracy"], abs=1e-6)
        assert b["outer_loss"] == pytest.approx(a["outer_loss"], rel=1e-4)


def test_compile_inner_flag_reaches_the_meta_optimizer() -> None:
    from implicit_meta.fewshot import TrainConfig, build_meta_optimizer, build_model

    parser = cli.build_parser()
    assert parser.parse_args(["train", "--compile-inner"]).compile_inner is True
    assert parser.parse_args(["train", "--no-compile-inner"]).compile_inner is False
    assert not hasattr(parser.parse_args(["train"]), "compile_inner")  # resume keeps the stored
    config = TrainConfig(compile_inner=True, backbone="conv4-4")
    meta = build_meta_optimizer(build_model(config, (1, 28, 28)), config)
    assert meta.problem.compile is True


def test_progress_bar_counts_planned_steps_and_shows_tasks_per_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a for a in TINY if a != "--no-progress"]
    assert cli.main(["train", *args, "--meta-steps", "3", "--out", str(tmp_path / "run")]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.startswith("meta-train") and "3/3" in line]
    assert final, bar  # the total is the planned number of meta-steps
    for key in ("tasks_s=", "acc=", "loss=", "stat=", "res=", "npc="):
        assert key in final[-1], (key, final[-1])
