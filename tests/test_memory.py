"""Peak memory of meta_backward does not grow with inner steps: measured, not assumed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import DEVICES

PROBE = Path(__file__).with_name("_memory_probe.py")
ROOT = PROBE.parent.parent


def peak_mib(mode: str, steps: int, device: str) -> float:
    # glibc keeps freed memory resident by default, so RSS would follow history rather than
    # live tensors; serving large blocks by mmap and trimming at once makes RSS track them.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, "-m", "tests._memory_probe", mode, str(steps), device],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_inner_steps() -> None:
    for device in DEVICES:
        short, long = peak_mib("implicit", 5, device), peak_mib("implicit", 200, device)
        # The implicit path keeps at most one gradient graph plus CG vectors (tens of MiB here);
        # allow 10% and 2 MiB of allocator noise.
        assert long <= 1.10 * short + 2.0, f"{device}: K=5 {short:.1f} MiB, K=200 {long:.1f} MiB"


def test_the_probe_detects_growth_in_an_unrolled_loop() -> None:
    # The same measurement on MAML-style unrolling must see memory grow with steps, or the
    # flat-memory test above would prove nothing.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    short, long = peak_mib("unrolled", 5, device), peak_mib("unrolled", 40, device)
    assert long > 3 * short, f"unrolled: K=5 {short:.1f} MiB, K=40 {long:.1f} MiB"
