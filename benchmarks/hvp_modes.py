"""Time Hessian-vector products: reverse-over-reverse (graph reuse) against forward-over-reverse.

    python benchmarks/hvp_modes.py [--device cpu|cuda] [--products 5] [--repeats 5]

Conv4 on one 20-way 1-shot task (the vmap issue's setting). For each strategy: the time to build
what the products need (the gradient, and its graph for reverse-over-reverse) plus ``--products``
products, as CG with that many steps would use them. Also under vmap over 4 tasks, where
reverse-over-reverse fails for BatchNorm. Prints one JSON object per line; the faster strategy is
what ``hvp="auto"`` should pick on that device.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python benchmarks/<script>.py` from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import statistics
import time

import torch

from benchmarks import _setting as S
from implicit_meta.functional import make_hvp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--products", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = S.make_model(device)
    support, _ = S.make_tasks(4, device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    vector = {k: torch.randn_like(v) for k, v in params.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def single(mode: str) -> None:
        loss = S.functional_loss(model, (support[0][0], support[1][0]))
        _, hvp_fn = make_hvp(loss, params, mode=mode)
        for _ in range(args.products):
            hvp_fn(vector)

    def batched(mode: str) -> None:
        def one(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            _, hvp_fn = make_hvp(S.functional_loss(model, (x, y)), params, mode=mode)
            out = vector
            for _ in range(args.products):
                out = hvp_fn(vector)
            return out

        torch.func.vmap(one, randomness="error")(*support)

    for label, fn in (("single task", single), ("vmap over 4 tasks", batched)):
        for mode in ("reverse_over_reverse", "forward_over_reverse"):
            row: dict[str, object] = {
                "case": label,
                "mode": mode,
                "products": args.products,
                "device": args.device,
            }
            try:
                fn(mode)
                sync()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn(mode)
                    sync()
                    times.append(time.perf_counter() - t0)
                row["seconds"] = statistics.median(times)
            except (RuntimeError, NotImplementedError) as error:
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
