"""Profile one batched meta-step: is it bound by the device's arithmetic or by launching work?

    python benchmarks/profile_step.py [--device cpu|cuda] [--tasks T] [--steps K]
                                      [--strategy vmap|loop] [--out benchmarks/results]

Runs ``meta_backward_batch`` once to warm up, then once under ``torch.profiler`` on the vmap
issue's setting. Prints one JSON object: the wall time, the summed device (CUDA kernel) time,
the number of kernel launches and of aten operator calls, and the top operators by self time;
writes it to ``profile_step_<device>.json``. On CUDA a device time far below the wall time means
the step waits on Python and kernel launches rather than on the GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python benchmarks/<script>.py` from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import implicit_meta as im
from benchmarks import _setting as S

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=None, help="default: 4 on CPU, 16 on CUDA")
    parser.add_argument("--steps", type=int, default=25, help="inner steps K")
    parser.add_argument("--strategy", default="vmap", choices=("vmap", "loop"))
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tasks = args.tasks or (16 if cuda else 4)

    model = S.make_model(device)
    support, query = S.make_tasks(tasks, device)
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        reg=S.REG,
        inner="sgd",
        inner_steps=args.steps,
        inner_lr=S.INNER_LR,
        cg_steps=S.CG_STEPS,
    )

    def meta_step() -> None:
        meta.zero_grad()
        meta.meta_backward_batch(S.cross_entropy, support, query, strategy=args.strategy)
        meta.step()
        if cuda:
            torch.cuda.synchronize()

    meta_step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        meta_step()
        wall = time.perf_counter() - t0

    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(float(getattr(e, "device_time", 0.0)) for e in kernels)
    aten = [e for e in events if e.key.startswith("aten::")]

    def self_time(event: object) -> float:
        if cuda:
            return float(getattr(event, "self_device_time_total", 0.0))
        return float(getattr(event, "self_cpu_time_total", 0.0))

    top = sorted(aten, key=self_time, reverse=True)[: args.top]
    row = {
        "device": args.device,
        "tasks": tasks,
        "inner_steps": args.steps,
        "strategy": args.strategy,
        "wall_s": round(wall, 4),
        "device_kernel_s": round(device_us / 1e6, 4),
        "kernel_launches": len(kernels),
        "aten_calls": int(sum(e.count for e in aten)),
        "top_ops_self_ms": {e.key: round(self_time(e) / 1e3, 2) for e in top},
        "torch": torch.__version__,
    }
    print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_step_{args.device.split(':')[0]}.json").write_text(
        json.dumps(row, indent=1)
    )


if __name__ == "__main__":
    main()
