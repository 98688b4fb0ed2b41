"""Equal-budget study of partial adaptation: adapt the head, or the whole network?

    python benchmarks/head_study.py train [--steps-5way 200] [--steps-20way 100] [--seeds 0 1]
    python benchmarks/head_study.py train --ways 5 --methods whole_first_order --steps-5way 70
    python benchmarks/head_study.py report

``train`` meta-trains a Conv4-32 on the embedded Omniglot (paper split, rotations as extra
classes) with each method below, on the same tasks and seeds for every method (meta-batch 4,
Adam 3e-3 with a cosine decay over the meta-steps, no clock in the arithmetic), then scores 600
held-out episodes (mean +- 95% CI) and the untrained initialisation under the same adaptation
on the same episodes. Settings: 5-way 1-shot and 20-way 1-shot, two seeds each, equal
meta-steps per setting; every run records its training seconds, so the report also states
seconds per meta-step. For an equal-time comparison, ``--ways`` and ``--methods`` add runs of
some methods at other meta-steps (keyed ``5w/whole_first_order/0@70``); the seconds per
meta-step to choose those steps come from ``benchmarks/head_cost.py`` on a quiet machine,
since the training runs share the machine with whatever else runs. Each finished run is
written at once to ``benchmarks/results/head_study.json``; an interrupted study keeps what it
has and skips it when run again.

Methods:
    whole_first_order  every parameter adapted, 5 SGD steps at 0.1, reg 1, first-order
                       (the library's default before this study)
    whole_gauss_newton the same, with the Gauss-Newton implicit gradient, CG 5
    head_first_order   the head adapted by dense Newton (8 steps), reg 0.5; the body gets the
                       direct gradient of the query loss only
    head_exact         the same head problem, the exact implicit gradient: CG 20 on the head's
                       PSD system and the mixed term for the body
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

import torch

from implicit_meta.data import EpisodeSampler
from implicit_meta.fewshot import TrainConfig, build_meta_optimizer, build_model
from implicit_meta.fewshot.evaluation import confidence_interval, episode_accuracies
from implicit_meta.fewshot.losses import cross_entropy, cross_entropy_and_accuracy
from implicit_meta.fewshot.meta_splits import load_splits

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "head_study.json"
BASE = TrainConfig(
    shots=1,
    queries=15,
    backbone="conv4-32",
    meta_batch=4,
    meta_lr=3e-3,
    lr_schedule="cosine",
    threads=2,
    device="cpu",
)
METHODS: dict[str, dict[str, Any]] = {
    "whole_first_order": {"adapt": "all", "reg": 1.0, "cg_steps": 0},
    "whole_gauss_newton": {"adapt": "all", "reg": 1.0, "curvature": "gauss_newton", "cg_steps": 5},
    "head_first_order": {"adapt": "head", "reg": 0.5, "cg_steps": 0},
    "head_exact": {"adapt": "head", "reg": 0.5, "curvature": "gauss_newton", "cg_steps": 20},
}
EVAL_EPISODES = 600
EVAL_SEED = 12345


def load() -> dict[str, Any]:
    if RESULTS.exists():
        return dict(json.loads(RESULTS.read_text()))
    return {"runs": {}, "baselines": {}}


def save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(RESULTS)


def config_for(method: str, ways: int, steps: int, seed: int) -> TrainConfig:
    return BASE.replace(ways=ways, meta_steps=steps, seed=seed, **METHODS[method])


def evaluate(config: TrainConfig, model: torch.nn.Module, splits: Any) -> dict[str, float]:
    meta = build_meta_optimizer(model, config)
    sampler = EpisodeSampler(
        splits.test, config.ways, config.shots, config.queries, EVAL_SEED, torch.device("cpu")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accs = episode_accuracies(meta, sampler, EVAL_EPISODES)
    mean, ci95, _ = confidence_interval(accs)
    return {"accuracy": mean, "ci95": ci95}


def train_run(config: TrainConfig, splits: Any) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    model = build_model(config, splits.train.image_shape, "cpu")
    meta = build_meta_optimizer(model, config)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        meta.outer_optimizer, T_max=config.meta_steps, eta_min=0.0
    )
    sampler = EpisodeSampler(
        splits.train, config.ways, config.shots, config.queries, config.seed, torch.device("cpu")
    )
    stationarity = []
    started = time.perf_counter()
    for _ in range(config.meta_steps):
        batch = sampler.sample(config.meta_batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta.zero_grad()
            result = meta.meta_backward_batch(
                cross_entropy,
                (batch.xs, batch.ys),
                (batch.xq, batch.yq),
                outer_loss_fn=cross_entropy_and_accuracy,
                strategy="loop",
            )
            meta.step()
        schedule.step()
        stationarity.append(result.relative_stationarity)
    elapsed = time.perf_counter() - started
    relative = torch.cat(stationarity)
    return {
        "config": config.to_dict(),
        "train_seconds": elapsed,
        "seconds_per_step": elapsed / config.meta_steps,
        "relative_stationarity_median": float(relative.median()),
        "relative_stationarity_max": float(relative.max()),
        **evaluate(config, model, splits),
    }


def baseline(config: TrainConfig, splits: Any) -> dict[str, float]:
    torch.manual_seed(config.seed)
    return evaluate(config, build_model(config, splits.train.image_shape, "cpu"), splits)


def train_all(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    splits = load_splits("omniglot", None, "paper")
    results = load()
    plan = [
        (method, ways, steps, seed)
        for ways, steps in ((5, args.steps_5way), (20, args.steps_20way))
        if ways in args.ways
        for seed in args.seeds
        for method in args.methods
    ]
    for method, ways, steps, seed in plan:
        key = f"{ways}w/{method}/{seed}@{steps}"
        if key in results["runs"]:
            continue
        config = config_for(method, ways, steps, seed)
        base_key = f"{ways}w/{config.adapt}/{seed}"
        if base_key not in results["baselines"]:
            results["baselines"][base_key] = baseline(config, splits)
            save(results)
        run = train_run(config, splits)
        results["runs"][key] = run
        save(results)
        print(json.dumps({key: {k: v for k, v in run.items() if k != "config"}}), flush=True)


def pct(result: dict[str, float]) -> str:
    return f"{100 * result['accuracy']:.1f}% ± {100 * result['ci95']:.1f}%"


def report(args: argparse.Namespace) -> None:
    del args
    results = load()
    order = list(METHODS)
    print(
        "| setting | method | seed | meta-steps | held-out accuracy | init, same adaptation "
        "| rel. stationarity, median / max |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")

    def sort_key(item: tuple[str, Any]) -> tuple[int, int, int, int]:
        config = item[1]["config"]
        method = item[0].split("/")[1]
        return (config["ways"], config["meta_steps"], config["seed"], order.index(method))

    for key, run in sorted(results["runs"].items(), key=sort_key):
        config = run["config"]
        base = results["baselines"][f"{config['ways']}w/{config['adapt']}/{config['seed']}"]
        print(
            f"| {config['ways']}-way 1-shot | {key.split('/')[1]} | {config['seed']} | "
            f"{config['meta_steps']} | {pct(run)} | {pct(base)} | "
            f"{run['relative_stationarity_median']:.0e} / {run['relative_stationarity_max']:.0e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    train.add_argument("--steps-5way", type=int, default=200)
    train.add_argument("--steps-20way", type=int, default=100)
    train.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    train.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    sub.add_parser("report")
    args = parser.parse_args()
    {"train": train_all, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
