from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from implicit_meta import cli

pytestmark = pytest.mark.filterwarnings("ignore:I \\+ H/reg is not positive definite")

TINY = [
    "--backbone", "conv4-8", "--ways", "3", "--shots", "1", "--queries", "2",
    "--inner-steps", "2", "--cg-steps", "2", "--meta-batch", "2", "--threads", "1",
    "--meta-steps", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "run"
    previous = torch.get_num_threads()
    assert cli.main(["train", *TINY, "--eval-episodes", "12", "--val-episodes", "4",
                     "--val-every", "1", "--out", str(out)]) == 0  # fmt: skip
    torch.set_num_threads(previous)
    return out


def test_evaluate_prints_text_and_json(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    json_path = tmp_path / "eval" / "result.json"
    code = cli.main(
        ["evaluate", "--checkpoint", str(run_dir), "--episodes", "12",
         "--json", str(json_path), "--no-progress", "--device", "cpu", "--threads", "1"]
    )  # fmt: skip
    assert code == 0
    text, baseline_text, line = capsys.readouterr().out.strip().splitlines()
    final = json.loads((run_dir / "evaluation.json").read_text())
    # A run folder means its best.pt (the checkpoint the training run's evaluation scored).
    assert text.startswith(f"{run_dir / 'best.pt'}: ") and final["checkpoint"].endswith("best.pt")
    match = re.search(
        r"3-way 1-shot accuracy: (\d+\.\d\d)% ± (\d+\.\d\d)% \(95% CI over 12 episodes\)$", text
    )
    assert match is not None, text
    payload = json.loads(line)
    assert json.loads(json_path.read_text()) == payload
    assert payload["episodes"] == 12 and payload["ways"] == 3 and payload["shots"] == 1
    assert payload["dataset"] == "omniglot" and payload["backbone"] == "conv4-8"
    assert 0.0 <= payload["accuracy"] <= 1.0
    assert payload["ci95"] == pytest.approx(1.96 * payload["std"] / math.sqrt(12))
    assert float(match.group(1)) == pytest.approx(100 * payload["accuracy"], abs=0.006)
    assert float(match.group(2)) == pytest.approx(100 * payload["ci95"], abs=0.006)
    # Each episode has 6 queries: the mean of 12 episode accuracies is a multiple of 1/72.
    assert payload["accuracy"] * 72 == pytest.approx(round(payload["accuracy"] * 72), abs=1e-4)
    # Same seed and episodes as the training run's final evaluation: the same numbers, for
    # the meta-trained model and for the untrained initialisation.
    assert payload["accuracy"] == pytest.approx(final["accuracy"], abs=1e-12)
    assert payload["baseline"]["accuracy"] == pytest.approx(
        final["baseline"]["accuracy"], abs=1e-12
    )
    assert baseline_text.startswith("untrained initialisation, same adaptation and episodes: ")
    assert f"{100 * payload['baseline']['accuracy']:.2f}%" in baseline_text


def test_evaluate_picks_the_last_checkpoint_on_request(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    args = ["evaluate", "--episodes", "3", "--no-progress", "--threads", "1", "--no-baseline"]
    assert cli.main([*args, "--checkpoint", str(run_dir), "--which", "last"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{run_dir / 'checkpoint.pt'}: ")
    assert "baseline" not in json.loads(lines[1])


def test_evaluate_other_seed_draws_other_episodes(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    args = ["evaluate", "--checkpoint", str(run_dir / "checkpoint.pt"), "--episodes", "12",
            "--no-progress", "--threads", "1"]  # fmt: skip
    assert cli.main([*args, "--seed", "1"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main([*args, "--seed", "2"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first["accuracy"], first["std"]) != (second["accuracy"], second["std"])


def test_evaluate_errors(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["evaluate", "--checkpoint", str(run_dir / "checkpoint.pt"),
                     "--episodes", "0"]) == 2  # fmt: skip
    assert "episodes must be positive" in capsys.readouterr().err
    # A file that is not a checkpoint: one line that says so, none of torch's advice.
    assert cli.main(["evaluate", "--checkpoint", str(run_dir / "config.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a checkpoint" in err and "weights_only" not in err
    if not torch.cuda.is_available():
        assert cli.main(["evaluate", "--checkpoint", str(run_dir / "checkpoint.pt"),
                         "--device", "cuda"]) == 2  # fmt: skip
        assert "CUDA is not available" in capsys.readouterr().err


def test_help_and_python_dash_m(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--dataset", "--root", "--protocol", "--ways", "--shots", "--queries",
                 "--backbone", "--inner", "--inner-steps", "--inner-lr", "--reg", "--cg-steps",
                 "--meta-batch", "--meta-steps", "--meta-lr", "--device", "--seed", "--out",
                 "--resume", "--eval-episodes", "--time-budget"):  # fmt: skip
        assert flag in help_text, flag
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--help"])
    evaluate_help = capsys.readouterr().out
    assert "95% confidence" in evaluate_help and "%%" not in evaluate_help
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2


def test_train_rejects_an_unknown_inner_solver_before_creating_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--inner", "sdg", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sdg" in err and "training in" not in err
    assert not out.exists()
