"""Time one inner SGD step eagerly and under ``torch.compile``: does compiling pay?

    python benchmarks/compiled_step.py [--device cpu|cuda] [--tasks T] [--steps 20]
                                       [--variants ...] [--out benchmarks/results]

One step of the proximal inner objective of the vmap issue's setting (Conv4, 20-way 1-shot,
reg 2, lr 0.1): the gradient of ``L_in(phi) + reg/2 ||phi - theta||^2`` and the update. Variants:

    eager_autograd   what the library runs outside transforms (plain autograd)
    eager_func       torch.func.grad, what it runs inside transforms
    compiled         torch.compile(fullgraph=True) of the torch.func.grad step
    cudagraphs       the same with mode="reduce-overhead" (CUDA graphs; CUDA only)
    vmap_eager       the torch.func.grad step vmapped over T tasks (the batched path)
    vmap_compiled    torch.compile of that vmapped step

Each line of output is a JSON object: the compile time (first call) and the median time per
step over ``--repeats`` runs of ``--steps`` steps, the largest difference from the eager step
after ``--steps`` steps, and the device. Written to ``compiled_step_<device>.json``.
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
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks import _setting as S
from implicit_meta.functional.grad import grad as autograd_grad
from implicit_meta.functional.implicit import proximal_objective
from implicit_meta.module_losses import functional_loss, split_state

VARIANTS = (
    "eager_autograd",
    "eager_func",
    "compiled",
    "cudagraphs",
    "vmap_eager",
    "vmap_compiled",
)
ROOT = Path(__file__).resolve().parent.parent
Params = dict[str, Tensor]


def _step_fn(gradient: Callable[[Params], Params]) -> Callable[[Params], Params]:
    def step(params: Params) -> Params:
        grads = gradient(params)
        return {k: params[k] - S.INNER_LR * grads[k] for k in params}

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=None, help="default: 4 on CPU, 16 on CUDA")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tasks = args.tasks or (16 if cuda else 4)
    variants = args.variants or [v for v in VARIANTS if cuda or v != "cudagraphs"]

    model = S.make_model(device)
    (xs, ys), _ = S.make_tasks(tasks, device)
    theta, frozen, buffers = split_state(model)

    def objective_for(x: Tensor, y: Tensor) -> Callable[[Params], Tensor]:
        inner = functional_loss(model, S.cross_entropy, (x, y), frozen, buffers)
        return proximal_objective(inner, theta, S.REG)

    single = objective_for(xs[0], ys[0])

    def batched_step(params: Params, x: Tensor, y: Tensor) -> Params:
        return _step_fn(torch.func.grad(objective_for(x, y)))(params)

    vmapped = torch.func.vmap(batched_step, in_dims=(0, 0, 0), randomness="error")
    task_theta = {k: v.unsqueeze(0).expand(tasks, *v.shape).clone() for k, v in theta.items()}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def run(step: Callable[..., Params], start: Params, *extra: Tensor) -> Params:
        params = start
        for _ in range(args.steps):
            params = step(params, *extra)
        return params

    eager_single = run(_step_fn(torch.func.grad(single)), theta)
    eager_batched = run(vmapped, task_theta, xs, ys)
    results = []
    for variant in variants:
        if variant.startswith("vmap"):
            step: Callable[..., Params] = vmapped
            start, extra, reference = task_theta, (xs, ys), eager_batched
        else:
            gradient = autograd_grad(single) if variant == "eager_autograd" else None
            step = _step_fn(gradient or torch.func.grad(single))
            start, extra, reference = theta, (), eager_single
        if variant in ("compiled", "vmap_compiled"):
            step = torch.compile(step, fullgraph=True)
        elif variant == "cudagraphs":
            step = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        try:
            t0 = time.perf_counter()
            step(start, *extra)  # compilation, lazy initialisation
            sync()
            first_call = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = run(step, start, *extra)
                sync()
                times.append((time.perf_counter() - t0) / args.steps)
        except Exception as error:  # a variant that fails is a result too
            row = {"variant": variant, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
        else:
            difference = max(float((out[k] - reference[k]).abs().max()) for k in reference)
            row = {
                "variant": variant,
                "first_call_s": round(first_call, 3),
                "ms_per_step": round(1e3 * statistics.median(times), 3),
                "ms_per_step_all": [round(1e3 * t, 3) for t in times],
                "max_abs_diff_vs_eager": difference,
            }
        row.update(device=args.device, tasks=tasks if variant.startswith("vmap") else 1)
        row["torch"] = torch.__version__
        print(json.dumps(row), flush=True)
        results.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compiled_step_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
