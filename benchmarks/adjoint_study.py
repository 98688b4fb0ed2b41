"""Equal-budget study of the adjoint: which meta-gradient trains best on Omniglot.

    python benchmarks/adjoint_study.py train  [--steps 300] [--steps-20way 200] [--seeds 0 1]
    python benchmarks/adjoint_study.py timing [--timing-steps 10]
    python benchmarks/adjoint_study.py report

``train`` meta-trains a Conv4-32 on the embedded Omniglot (paper split, rotations as extra
classes) with each adjoint below, the same tasks and seeds for all, 5 SGD inner steps at 0.1,
reg 1, CG 5, meta-batch 4, Adam 3e-3 with a cosine decay over the meta-steps (no clock in the
arithmetic), then scores 600 held-out episodes (mean +- 95% CI) and the untrained
initialisation under the same adaptation on the same episodes. It records the share of tasks per
CG status. Then, on one meta-trained network (the seed-0 5-way Gauss-Newton run), it measures
for every method the cosine between its meta-gradient and a converged reference of its own
system (SciPy MINRES, which needs only symmetry, to a relative residual of 1e-6 or 300
iterations, float32 products), and against the exact system I + H/reg, over 8 training tasks.
Setting 1: 5-way 1-shot, every method, every seed. Setting 2: 20-way 1-shot, one seed,
first-order, Gauss-Newton and the best of the rest in setting 1. Each finished run is written
at once to ``benchmarks/results/adjoint_study.json``, so an interrupted study keeps what it has
and skips it when run again.

``train --only newton_cg --steps 70 --seeds 0`` trains one method alone (into its own file,
so it can run beside the main study); ``report`` merges it in. A run at other than its
setting's standard steps (300 at 5-way, 200 at 20-way) is keyed ``5w/newton_cg@70/0``.

``weights --network 5w-hessian-0`` prints, for 32 tasks on a saved network, ||x|| / ||b|| of
the Hessian, damped and Gauss-Newton solves: whether a few tasks dominate a meta-batch.

``timing`` measures seconds per meta-step of every method side by side in one process (run it
on a quiet machine; the training runs are not timed). ``report`` prints the tables as Markdown.

Methods:
    first_order      cg_steps=0: grad L_out(phi*)
    hessian          I + H/reg, CG with the non-positive-curvature stop (the former default)
    official_damped  the official iMAML code's (1 + 1) v + H v / (reg + 10)
    gauss_newton     I + J^T H_l J / reg
    newton_cg        newton_cg inner solver (2 Newton steps of 20 CG steps each, line search
                     from 1), Hessian CG: the paper's Hessian-free variant

Order: the four cheap methods on every seed first, then the cosines, then the 20-way runs (with
the better of hessian and official_damped as "the best of the rest"), then Newton-CG, about 4x
slower per meta-step and 15x slower to evaluate, so that a study cut short by the clock still
compares the main methods on both seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import time
import warnings
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, minres  # type: ignore[import-untyped]

from implicit_meta import CGStatus
from implicit_meta.data import EpisodeSampler
from implicit_meta.fewshot import TrainConfig, build_meta_optimizer, build_model
from implicit_meta.fewshot.evaluation import confidence_interval, episode_accuracies
from implicit_meta.fewshot.losses import cross_entropy
from implicit_meta.fewshot.meta_batch import meta_train_step
from implicit_meta.fewshot.meta_splits import load_splits
from implicit_meta.functional import curvature_products, solve_adjoint, solve_inner
from implicit_meta.functional.curvature import resolve_curvature
from implicit_meta.module_losses import functional_inner_loss, functional_loss, split_state
from implicit_meta.solvers import get_inner_solver

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "adjoint_study.json"
MODELS = ROOT / "benchmarks" / "results" / "adjoint_study_models"  # not committed
BASE = TrainConfig(
    shots=1,
    queries=15,
    backbone="conv4-32",
    inner="sgd",
    inner_steps=5,
    inner_lr=0.1,
    reg=1.0,
    cg_steps=5,
    meta_batch=4,
    meta_lr=3e-3,
    lr_schedule="cosine",
    time_budget=0.0,
    threads=2,
    device="cpu",
)
METHODS: dict[str, dict[str, Any]] = {
    "first_order": {"cg_steps": 0},
    "hessian": {"curvature": "hessian"},
    "official_damped": {
        "curvature": "hessian",
        "damping": 1.0 * BASE.reg,
        "curvature_scale": BASE.reg / (BASE.reg + 10.0),
    },
    "gauss_newton": {"curvature": "gauss_newton"},
    "newton_cg": {"curvature": "hessian", "inner": "newton_cg", "inner_steps": 2, "inner_lr": 1.0},
}
STANDARD_STEPS = {5: 300, 20: 200}  # the budget per setting; other runs say theirs
EVAL_EPISODES = 600
COSINE_TASKS = 8
MINRES_STEPS = 300
MINRES_RTOL = 1e-6


def load(path: Path = RESULTS) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text()))
    return {"runs": {}, "baselines": {}, "timing": {}}


def save(results: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def load_all() -> dict[str, Any]:
    """The main results with those of ``--only`` runs (their own files) merged in."""
    results = load()
    for extra in sorted(RESULTS.parent.glob("adjoint_study_*.json")):
        more = load(extra)
        for part in ("runs", "baselines", "timing"):
            results.setdefault(part, {}).update(more.get(part, {}))
    return results


def run_key(method: str, ways: int, steps: int, seed: int, standard: int) -> str:
    """``5w/gauss_newton/0``; a run at other than the setting's standard steps says its steps."""
    name = method if steps == standard else f"{method}@{steps}"
    return f"{ways}w/{name}/{seed}"


def method_of(key: str) -> str:
    """The method of a run key (``5w/newton_cg@70/0`` -> ``newton_cg``)."""
    return key.split("/")[1].split("@")[0]


def config_for(method: str, ways: int, steps: int, seed: int) -> TrainConfig:
    return BASE.replace(ways=ways, meta_steps=steps, seed=seed, **METHODS[method])


def lr_at(config: TrainConfig, step: int) -> float:
    return config.meta_lr * 0.5 * (1.0 + float(np.cos(np.pi * step / config.meta_steps)))


def evaluate(config: TrainConfig, model: torch.nn.Module, splits: Any) -> dict[str, float]:
    meta = build_meta_optimizer(model, config)
    sampler = EpisodeSampler(
        splits.test, config.ways, config.shots, config.queries, 12345, torch.device("cpu")
    )
    accs = episode_accuracies(meta, sampler, EVAL_EPISODES)
    mean, ci95, _ = confidence_interval(accs)
    return {"accuracy": mean, "ci95": ci95}


def system_cosines(config: TrainConfig, model: torch.nn.Module, splits: Any) -> dict[str, float]:
    """Cosine of the method's meta-gradient with a MINRES solve of its own system, 16 tasks."""
    adjoint = config.adjoint()
    sampler = EpisodeSampler(
        splits.train, config.ways, config.shots, config.queries, 999, torch.device("cpu")
    )
    theta, frozen, buffers = split_state(model)
    names = list(theta)
    shapes = [theta[k].shape for k in names]
    sizes = [theta[k].numel() for k in names]
    solver = get_inner_solver(config.inner)
    found: dict[str, list[float]] = {}
    residuals: dict[str, list[float]] = {}
    for _ in range(COSINE_TASKS):
        ep = sampler.sample(1)
        support = (ep.xs[0], ep.ys[0])
        query = (ep.xq[0], ep.yq[0])
        inner = functional_inner_loss(model, cross_entropy, support, frozen, buffers)
        outer = functional_loss(model, cross_entropy, query, frozen, buffers)
        phi = solve_inner(
            inner, theta, solver, reg=config.reg, steps=config.inner_steps, lr=config.inner_lr
        )
        b = dict(torch.func.grad(outer)(phi))
        ours = solve_adjoint(adjoint, inner, phi, b).cg.solution
        mine = torch.cat([ours[k].reshape(-1) for k in names]).double().numpy()
        flat_b = torch.cat([b[k].reshape(-1) for k in names]).double().numpy()
        systems = {"exact": ("hessian", 1.0, 1.0 / config.reg)}
        own_is_exact = (
            resolve_curvature(adjoint.curvature, inner) == "hessian"
            and adjoint.damping == 0.0
            and adjoint.curvature_scale == 1.0
        )
        if not adjoint.first_order and not own_is_exact:
            curvature = resolve_curvature(adjoint.curvature, inner)
            systems["own"] = (
                curvature,
                1.0 + adjoint.damping / adjoint.reg,
                adjoint.curvature_scale / adjoint.reg,
            )
        for name, (curvature, identity, weight) in systems.items():
            reference, residual = minres_solve(
                curvature, inner, phi, flat_b, identity, weight, names, shapes, sizes
            )
            cosine = float(mine @ reference / (np.linalg.norm(mine) * np.linalg.norm(reference)))
            found.setdefault(name, []).append(cosine)
            residuals.setdefault(name, []).append(residual)
            if name == "exact" and own_is_exact and not adjoint.first_order:
                found.setdefault("own", []).append(cosine)
                residuals.setdefault("own", []).append(residual)
    out: dict[str, float] = {}
    for name, values in found.items():
        out[f"cosine_{name}_mean"] = float(np.mean(values))
        out[f"cosine_{name}_min"] = float(np.min(values))
        out[f"reference_{name}_residual_max"] = float(np.max(residuals[name]))
    return out


def minres_solve(
    curvature: Any,
    inner: Any,
    phi: dict[str, torch.Tensor],
    flat_b: np.ndarray,  # float64
    identity: float,
    weight: float,
    names: list[str],
    shapes: list[torch.Size],
    sizes: list[int],
) -> tuple[np.ndarray, float]:
    _, _, product = curvature_products(curvature, inner, phi)

    def np_matvec(x: np.ndarray) -> np.ndarray:
        # Products in the model's float32 (float64 convolutions are ~10x slower on a CPU);
        # MINRES itself runs in float64.
        flat = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
        v = {
            k: p.view(sh) for k, p, sh in zip(names, torch.split(flat, sizes), shapes, strict=True)
        }
        cv = product(v)
        out = torch.cat([(identity * v[k] + weight * cv[k]).reshape(-1) for k in names])
        return out.double().numpy()

    size = sum(sizes)
    operator = LinearOperator((size, size), matvec=np_matvec, dtype=np.float64)
    reference, _ = minres(operator, flat_b, rtol=MINRES_RTOL, maxiter=MINRES_STEPS)
    residual = float(np.linalg.norm(np_matvec(reference) - flat_b) / np.linalg.norm(flat_b))
    return reference, residual


def train_run(config: TrainConfig, splits: Any, key: str) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    model = build_model(config, splits.train.image_shape, "cpu")
    meta = build_meta_optimizer(model, config)
    sampler = EpisodeSampler(
        splits.train, config.ways, config.shots, config.queries, config.seed, torch.device("cpu")
    )
    counts = {status.name: 0 for status in CGStatus}
    started = time.perf_counter()
    for step in range(config.meta_steps):
        for group in meta.outer_optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        batch = sampler.sample(config.meta_batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta.zero_grad()
            result = meta.meta_backward_batch(
                cross_entropy,
                (batch.xs, batch.ys),
                (batch.xq, batch.yq),
                reduction="mean",
                strategy="loop",
            )
            meta.step()
        for status in result.cg_status.tolist():
            counts[CGStatus(status).name] += 1
    elapsed = time.perf_counter() - started
    total = sum(counts.values())
    run: dict[str, Any] = {
        "config": config.to_dict(),
        "train_seconds": elapsed,
        "status_share": {k: v / total for k, v in counts.items() if v},
        **evaluate(config, model, splits),
    }
    MODELS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), MODELS / f"{key.replace('/', '-')}.pt")
    return run


def baseline(config: TrainConfig, splits: Any) -> dict[str, float]:
    torch.manual_seed(config.seed)
    model = build_model(config, splits.train.image_shape, "cpu")
    return evaluate(config, model, splits)


def plan(args: argparse.Namespace, results: dict[str, Any]) -> list[tuple[str, int, int, int]]:
    if args.only:
        return [(args.only, 5, args.steps, seed) for seed in args.seeds]
    # Most informative first, so a study cut short by the clock loses the least.
    cheap = ["gauss_newton", "first_order", "official_damped", "hessian"]
    runs = [(m, 5, args.steps, seed) for seed in args.seeds for m in cheap]
    # The best second-order alternative to Gauss-Newton on setting 1, by its mean over seeds.
    rest = [
        m for m in ("hessian", "official_damped") if f"5w/{m}/{args.seeds[-1]}" in results["runs"]
    ]
    if len(rest) == 2:
        best = max(rest, key=lambda m: mean_accuracy(results, m, args.seeds))
        twenty = ("first_order", "gauss_newton", best)
        runs += [(m, 20, args.steps_20way, args.seeds[0]) for m in twenty]
    runs += [("newton_cg", 5, args.steps, seed) for seed in args.seeds]
    return runs


def key_of(method: str, ways: int, steps: int, seed: int) -> str:
    return run_key(method, ways, steps, seed, STANDARD_STEPS[ways])


def mean_accuracy(results: dict[str, Any], method: str, seeds: list[int]) -> float:
    return float(np.mean([results["runs"][f"5w/{method}/{s}"]["accuracy"] for s in seeds]))


def train_all(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    splits = load_splits("omniglot", None, "paper")
    path = RESULTS.with_name(f"adjoint_study_{args.only}.json") if args.only else RESULTS
    if args.results:
        path = RESULTS.with_name(args.results)
    results = load(path)
    while True:
        keys = {r: key_of(*r) for r in plan(args, results)}
        todo = [r for r in keys if keys[r] not in results["runs"]]
        cheap_done = not any(r[1] == 5 and r[0] != "newton_cg" for r in todo)
        if cheap_done and not results.get("cosines") and not args.only:
            results["cosines"] = cosines_on_one_network(args.seeds[0], splits)
            save(results, path)
            print(json.dumps({"cosines": results["cosines"]}), flush=True)
            continue
        if not todo:
            break
        method, ways, steps, seed = todo[0]
        key = keys[todo[0]]
        config = config_for(method, ways, steps, seed)
        base_key = f"{ways}w/{config.inner}/{seed}"
        if base_key not in results["baselines"]:
            results["baselines"][base_key] = baseline(config, splits)
            save(results, path)
        run = train_run(config, splits, key=key)
        results["runs"][key] = run
        save(results, path)
        print(json.dumps({key: {k: v for k, v in run.items() if k != "config"}}), flush=True)


def cosines_on_one_network(seed: int, splits: Any) -> dict[str, Any]:
    """Every method's meta-gradient on the 5-way Gauss-Newton-trained network of ``seed``."""
    reference = config_for("gauss_newton", 5, 1, seed)
    model = build_model(reference, splits.train.image_shape, "cpu")
    model.load_state_dict(torch.load(MODELS / f"5w-gauss_newton-{seed}.pt", weights_only=True))
    found: dict[str, Any] = {"network": f"5w/gauss_newton/{seed}"}
    for method in METHODS:
        found[method] = system_cosines(config_for(method, 5, 1, seed), model, splits)
        print(json.dumps({method: found[method]}), flush=True)
    return found


def timing(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    splits = load_splits("omniglot", None, "paper")
    results = load()
    for ways in (5, 20):
        for method in METHODS:
            config = config_for(method, ways, args.timing_steps, 0)
            torch.manual_seed(0)
            model = build_model(config, splits.train.image_shape, "cpu")
            meta = build_meta_optimizer(model, config)
            sampler = EpisodeSampler(
                splits.train, ways, config.shots, config.queries, 0, torch.device("cpu")
            )
            batches = [sampler.sample(config.meta_batch) for _ in range(args.timing_steps + 1)]
            times = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for batch in batches:
                    started = time.perf_counter()
                    meta_train_step(meta, batch, strategy="loop")
                    times.append(time.perf_counter() - started)
            median = float(np.median(times[1:]))  # the first step warms up
            results["timing"][f"{ways}w/{method}"] = median
            print(json.dumps({f"{ways}w/{method}": median}), flush=True)
    save(results)


def pct(result: dict[str, float]) -> str:
    return f"{100 * result['accuracy']:.1f}% ± {100 * result['ci95']:.1f}%"


def weights(args: argparse.Namespace) -> None:
    """||x|| / ||b|| per task for each adjoint on one saved network: do a few tasks dominate?"""
    torch.set_num_threads(args.threads)
    splits = load_splits("omniglot", None, "paper")
    config = config_for("hessian", 5, 1, 0)
    model = build_model(config, splits.train.image_shape, "cpu")
    model.load_state_dict(torch.load(MODELS / f"{args.network}.pt", weights_only=True))
    theta, frozen, buffers = split_state(model)
    sampler = EpisodeSampler(splits.train, 5, 1, 15, 4242, torch.device("cpu"))
    episodes = [sampler.sample(1) for _ in range(32)]
    found: dict[str, Any] = {"network": args.network}
    for method in ("hessian", "official_damped", "gauss_newton"):
        adjoint = config_for(method, 5, 1, 0).adjoint()
        ratios = []
        for ep in episodes:
            support, query = (ep.xs[0], ep.ys[0]), (ep.xq[0], ep.yq[0])
            inner = functional_inner_loss(model, cross_entropy, support, frozen, buffers)
            outer = functional_loss(model, cross_entropy, query, frozen, buffers)
            phi = solve_inner(inner, theta, get_inner_solver("sgd"), reg=1.0, steps=5, lr=0.1)
            b = dict(torch.func.grad(outer)(phi))
            x = solve_adjoint(adjoint, inner, phi, b).cg.solution
            norm = lambda t: float(torch.cat([v.reshape(-1) for v in t.values()]).norm())  # noqa: E731
            ratios.append(norm(x) / norm(b))
        ordered = sorted(ratios)
        found[method] = {
            "median": ordered[len(ordered) // 2],
            "max": ordered[-1],
            "top_task_share": ordered[-1] / sum(ordered),
        }
        print(json.dumps({method: found[method]}), flush=True)
    results = load(RESULTS.with_name("adjoint_study_weights.json"))
    results.setdefault("weights", {})[args.network] = found
    save(results, RESULTS.with_name("adjoint_study_weights.json"))


def report(args: argparse.Namespace) -> None:
    results = load_all()
    for ways in (5, 20):
        rows = sorted(k for k in results["runs"] if k.startswith(f"{ways}w/"))
        if not rows:
            continue
        print(f"\n{ways}-way 1-shot\n")
        print(
            "| method | seed | meta-steps | held-out accuracy | init, same adaptation "
            "| s / step | CG status |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for method in METHODS:
            for key in (k for k in rows if method_of(k) == method):
                seed = key.split("/")[2]
                run = results["runs"][key]
                base = results["baselines"][f"{ways}w/{run['config']['inner']}/{seed}"]
                shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in run["status_share"].items())
                sec = results["timing"].get(f"{ways}w/{method}")
                seconds = f"{sec:.2f}" if sec is not None else "-"
                steps = run["config"]["meta_steps"]
                print(
                    f"| {method} | {seed} | {steps} | {pct(run)} | {pct(base)} | {seconds} "
                    f"| {shares} |"
                )
    found = results.get("cosines")
    if found:
        print(f"\nCosines on {found['network']} ({COSINE_TASKS} training tasks)\n")
        print(
            "| method | to a converged solve of its own system (mean, min) "
            "| to the exact I + H/reg (mean, min) | exact-system MINRES residual (max) |"
        )
        print("| --- | --- | --- | --- |")
        for method in METHODS:
            if method not in found:
                continue
            row = found[method]
            own = "-"
            if "cosine_own_mean" in row:
                own = f"{row['cosine_own_mean']:.3f}, {row['cosine_own_min']:.3f}"
            exact = f"{row['cosine_exact_mean']:.3f}, {row['cosine_exact_min']:.3f}"
            print(f"| {method} | {own} | {exact} | {row['reference_exact_residual_max']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "timing", "report", "weights"))
    parser.add_argument("--network", default="5w-hessian-0", help="saved model for `weights`")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--steps-20way", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--only",
        choices=list(METHODS),
        default=None,
        help="train just this method on 5-way (its results go to adjoint_study_<method>.json)",
    )
    parser.add_argument(
        "--results",
        default=None,
        help="file name under benchmarks/results for this call's runs (two --only calls at once)",
    )
    args = parser.parse_args()
    commands = {"train": train_all, "timing": timing, "report": report, "weights": weights}
    commands[args.command](args)


if __name__ == "__main__":
    main()
