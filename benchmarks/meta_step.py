"""Time one meta-step and its peak memory for K inner steps, against the peers, side by side.

    python benchmarks/meta_step.py [--device cpu|cuda] [--tasks T] [--steps 5 25 100]
                                   [--methods ...] [--repeats R] [--out benchmarks/results]

Every (method, K) runs in fresh subprocesses, so peak memory is its own: after a warm-up
meta-step, the peak growth during the next meta-step(s) over what is live between steps -- peak
RSS on CPU (glibc set to return freed blocks at once, so RSS follows live memory),
``torch.cuda.max_memory_allocated`` on CUDA. On the CPU, time
is taken in a second process with the default allocator; on CUDA one process measures both.
Prints one JSON object per line and writes ``meta_step_<device>.json`` and
``meta_step_<device>.png``.

Methods:
    loop      this project, meta_backward_batch(strategy="loop") (one task after another)
    batched   this project, meta_backward_batch(strategy="vmap")
    loop_compiled  the loop with compile_inner=True (the first call, which compiles, is reported
              apart as first_call_s)
    torchopt  torchopt.diff.implicit.custom_root + solve_cg(maxiter=5), tasks in a loop
    maml      unrolled MAML with torch.func (differentiates through the K inner steps)
    maml_vmap functorch's recipe: unrolled MAML vmapped over the tasks (torch.func.grad inside
              torch.func.vmap, differentiated by autograd); its memory grows with K x tasks
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python benchmarks/<script>.py` from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("loop", "batched", "loop_compiled", "torchopt", "maml", "maml_vmap")
ROOT = Path(__file__).resolve().parent.parent


def run_one(
    method: str, steps: int, tasks: int, device_name: str, repeats: int
) -> dict[str, object]:
    import torch

    import implicit_meta as im
    from benchmarks import _setting as S

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device(device_name)
    model = S.make_model(device)
    support, query = S.make_tasks(tasks, device)
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)

    if method in ("loop", "batched", "loop_compiled"):
        meta = im.ImplicitMetaOptimizer(
            model,
            outer,
            reg=S.REG,
            inner="sgd",
            inner_steps=steps,
            inner_lr=S.INNER_LR,
            cg_steps=S.CG_STEPS,
            compile_inner=method == "loop_compiled",
        )
        strategy = "vmap" if method == "batched" else "loop"

        def meta_step() -> None:
            meta.zero_grad()
            meta.meta_backward_batch(S.cross_entropy, support, query, strategy=strategy)
            meta.step()
    elif method == "torchopt":
        meta_step = _torchopt_step(model, outer, support, query, steps, tasks)
    elif method == "maml":
        meta_step = _maml_step(model, outer, support, query, steps, tasks)
    elif method == "maml_vmap":
        meta_step = _maml_vmap_step(model, outer, support, query, steps, tasks)
    else:
        raise ValueError(method)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    meta_step()  # warm-up (lazy initialisation, optimizer state, compilation)
    sync()
    first_call = time.perf_counter() - t0
    # Peak memory of the steady-state meta-steps that follow, over what is live between them
    # (model, outer optimizer state, data): what one meta-step adds.
    S.reset_peak_rss()
    start_rss = S.rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_cuda = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        meta_step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - start_cuda) / 2**20
    else:
        peak = S.peak_rss_mib() - start_rss
    return {
        "method": method,
        "inner_steps": steps,
        "tasks": tasks,
        "device": device_name,
        "seconds": statistics.median(times),
        "seconds_all": times,
        "first_call_s": first_call,
        "peak_mib": round(peak, 1),
        "torch": torch.__version__,
    }


def _torchopt_step(model, outer, support, query, steps, tasks):
    import torch
    import torchopt

    from benchmarks import _setting as S

    names = [k for k, _ in model.named_parameters()]

    def task_loss(t: int, which: str):
        batch = support if which == "support" else query
        return S.functional_loss(model, (batch[0][t], batch[1][t]))

    def meta_step() -> None:
        outer.zero_grad()
        for t in range(tasks):
            inner = task_loss(t, "support")

            def objective(phi, theta, inner=inner):  # bind this task's loss
                params = dict(zip(names, phi, strict=True))
                distance = sum(((p - q) ** 2).sum() for p, q in zip(phi, theta, strict=True))
                return inner(params) + 0.5 * S.REG * distance

            @torchopt.diff.implicit.custom_root(
                torch.func.grad(objective, argnums=0),
                argnums=1,
                solve=torchopt.linear_solve.solve_cg(maxiter=S.CG_STEPS),
            )
            def solve(phi, theta):
                phi = tuple(p.detach() for p in phi)
                theta_d = tuple(p.detach() for p in theta)
                grad_fn = torch.func.grad(objective, argnums=0)
                for _ in range(steps):
                    grads = grad_fn(phi, theta_d)
                    phi = tuple(p - S.INNER_LR * g for p, g in zip(phi, grads, strict=True))
                return phi

            theta = tuple(model.parameters())
            phi = solve(tuple(p.detach().clone() for p in theta), theta)
            outer_loss = task_loss(t, "query")(dict(zip(names, phi, strict=True)))
            (outer_loss / tasks).backward()
        outer.step()

    return meta_step


def _maml_step(model, outer, support, query, steps, tasks):
    import torch

    from benchmarks import _setting as S

    def meta_step() -> None:
        outer.zero_grad()
        for t in range(tasks):
            inner = S.functional_loss(model, (support[0][t], support[1][t]))
            params = dict(model.named_parameters())
            for _ in range(steps):
                loss = inner(params)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {
                    k: v - S.INNER_LR * g for (k, v), g in zip(params.items(), grads, strict=True)
                }
            outer_loss = S.functional_loss(model, (query[0][t], query[1][t]))(params)
            (outer_loss / tasks).backward()
        outer.step()

    return meta_step


def _maml_vmap_step(model, outer, support, query, steps, tasks):
    import torch
    import torch.nn.functional as F

    from benchmarks import _setting as S

    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(params, x, y):
        state = dict(params)
        state.update({k: v.clone() for k, v in buffers.items()})
        return F.cross_entropy(torch.func.functional_call(model, state, (x,)), y)

    def task_loss(params, xs, ys, xq, yq):
        # The inner loop stays differentiable: torch.func.grad's output carries the graph back
        # to ``params`` for the outer backward, as in functorch's MAML example.
        for _ in range(steps):
            grads = torch.func.grad(loss)(params, xs, ys)
            params = {k: params[k] - S.INNER_LR * grads[k] for k in params}
        return loss(params, xq, yq)

    batched = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0), randomness="error")

    def meta_step() -> None:
        outer.zero_grad()
        params = dict(model.named_parameters())
        batched(params, support[0], support[1], query[0], query[1]).mean().backward()
        outer.step()

    return meta_step


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        rows = sorted(
            (r for r in results if r["method"] == method and "seconds" in r),
            key=lambda r: r["inner_steps"],
        )  # type: ignore[arg-type,return-value]
        if not rows:
            continue
        ks = [r["inner_steps"] for r in rows]
        ax_t.plot(ks, [r["seconds"] for r in rows], marker="o", label=method)
        ax_m.plot(ks, [r["peak_mib"] for r in rows], marker="o", label=method)
    for ax, label in ((ax_t, "seconds per meta-step"), (ax_m, "peak memory (MiB)")):
        ax.set_xlabel("inner steps K")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    device = results[0]["device"] if results else "?"
    fig.suptitle(f"one meta-step, 20-way 1-shot Conv4, {results[0]['tasks']} tasks, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=None, help="default: 4 on CPU, 16 on CUDA")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 25, 100])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="default: all on CUDA; all but maml_vmap on the CPU (5 GB at K=25, ~20 GB at K=100)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    tasks = args.tasks or (16 if cuda else 4)
    methods = args.methods or [m for m in METHODS if cuda or m != "maml_vmap"]
    if args.child:
        print(
            json.dumps(run_one(args.child[0], int(args.child[1]), tasks, args.device, args.repeats))
        )
        return

    # Memory is measured with glibc returning freed blocks at once (RSS then follows live
    # tensors); that turns every large allocation into a system call and distorts timings, so
    # time is measured in a second process with the default allocator.
    plain_env = dict(os.environ, PYTHONPATH=str(ROOT))
    memory_env = dict(plain_env, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    runs: tuple[tuple[str, dict[str, str], int], ...] = (
        ("memory", memory_env, 1),
        ("time", plain_env, args.repeats),
    )
    if args.device.startswith("cuda"):
        # CUDA's peak is the caching allocator's own count, unaffected by glibc: one process.
        runs = (("memory", plain_env, args.repeats),)
    results: list[dict[str, object]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"meta_step_{args.device.split(':')[0]}"
    for steps in args.steps:
        for method in methods:
            row: dict[str, object] = {}
            for purpose, env, repeats in runs:
                cmd = [
                    sys.executable,
                    __file__,
                    "--device",
                    args.device,
                    "--tasks",
                    str(tasks),
                    "--repeats",
                    str(repeats),
                    "--child",
                    method,
                    str(steps),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if done.returncode != 0:
                    row = {
                        "method": method,
                        "inner_steps": steps,
                        "tasks": tasks,
                        "device": args.device,
                        "error": (done.stderr.strip().splitlines() or ["?"])[-1],
                    }
                    break
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                if purpose == "memory":
                    row = measured
                else:
                    row.update(
                        seconds=measured["seconds"],
                        seconds_all=measured["seconds_all"],
                        first_call_s=measured["first_call_s"],
                    )
            print(json.dumps(row), flush=True)
            results.append(row)
            # Written after every row, so a run stopped by a time limit keeps what it measured.
            (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
