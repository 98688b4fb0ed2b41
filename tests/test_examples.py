from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_wrap_training_loop() -> None:
    out = _run("wrap_training_loop.py")
    assert re.search(r"ordinary training: \d+\.\d{3}", out), out
    assert re.search(r"iMAML\s+: \d+\.\d{3}", out), out


def test_sinusoid_regression() -> None:
    out = _run("sinusoid_regression.py")
    assert re.search(r"relative stationarity \d\.\d+e[-+]\d+, relative CG residual", out), out
    before = re.search(r"random init : (\d+\.\d{3}) \+- \d+\.\d{3}", out)
    after = re.search(r"meta-trained: (\d+\.\d{3}) \+- \d+\.\d{3}  \(3 meta-steps\)", out)
    assert before and after, out
    assert float(before[1]) > 0 and float(after[1]) > 0


def test_custom_inner_solver(tmp_path: Path) -> None:
    out = _run("custom_inner_solver.py", "--out", str(tmp_path / "run"))
    assert "clipped_cosine_gd" in out.splitlines()[0]
    assert "meta-trained 2 steps with clipped_cosine_gd" in out
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_fewshot_timm(tmp_path: Path) -> None:
    out = _run("fewshot_timm.py", "--out", str(tmp_path / "run"))
    assert "meta-trained 2 steps" in out and "3-way 1-shot accuracy" in out
    assert (tmp_path / "run" / "curves.png").is_file()


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_a_smoke_mode(script: str) -> None:
    source = (EXAMPLES / script).read_text()
    assert "--smoke" in source and "IMPLICIT_META_SMOKE" in source
