"""Cost of a head-only meta-step against its floor, side by side in one run.

    python benchmarks/head_cost.py [--ways 5] [--repeats 15] [--threads 2]

The floor is what any head-only method must pay: one forward and one backward of the body
(the Conv4 without its head) over every task's support and query images. Measured on the same
meta-batches (Omniglot 1-shot, 15 queries per class, Conv4-32, 4 tasks): the floor, the
head-only meta-step with the exact implicit gradient (dense Newton on the head, CG 20, the
mixed term for the body), the head-only first-order meta-step, and today's whole-network
first-order meta-step (5 SGD steps). Each is the median of ``--repeats`` meta-steps after two
warm-up steps, interleaved so that drifts in the machine's speed hit all alike. Prints one
JSON object; run it on a quiet machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from implicit_meta.data import EpisodeSampler
from implicit_meta.fewshot import TrainConfig, build_meta_optimizer, build_model
from implicit_meta.fewshot.losses import cross_entropy, cross_entropy_and_accuracy
from implicit_meta.fewshot.meta_splits import load_splits

SETTINGS = {
    "head_exact": {"adapt": "head", "reg": 0.5, "curvature": "gauss_newton", "cg_steps": 20},
    "head_first_order": {"adapt": "head", "reg": 0.5, "cg_steps": 0},
    "whole_first_order": {"adapt": "all", "reg": 1.0, "cg_steps": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_splits("omniglot", None, "paper")
    base = TrainConfig(ways=args.ways, shots=1, backbone="conv4-32", device="cpu")
    sampler = EpisodeSampler(splits.train, args.ways, 1, 15, 0, torch.device("cpu"))
    batches = [sampler.sample(base.meta_batch) for _ in range(args.repeats + 2)]
    torch.manual_seed(0)
    model = build_model(base, splits.train.image_shape, "cpu")
    metas = {name: build_meta_optimizer(model, base.replace(**s)) for name, s in SETTINGS.items()}

    def floor(batch: object) -> None:
        model.zero_grad()
        for t in range(base.meta_batch):
            for images in (batch.xs[t], batch.xq[t]):  # type: ignore[attr-defined]
                features = model.forward_head(model.forward_features(images), pre_logits=True)
                features.sum().backward()

    def meta_step(name: str) -> Callable[[object], None]:
        meta = metas[name]

        def run(batch: object) -> None:
            meta.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                meta.meta_backward_batch(
                    cross_entropy,
                    (batch.xs, batch.ys),  # type: ignore[attr-defined]
                    (batch.xq, batch.yq),  # type: ignore[attr-defined]
                    outer_loss_fn=cross_entropy_and_accuracy,
                    strategy="loop",
                )

        return run

    jobs = {"floor": floor, **{name: meta_step(name) for name in SETTINGS}}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for i, batch in enumerate(batches):
        for name, job in jobs.items():
            started = time.perf_counter()
            job(batch)
            if i >= 2:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        json.dumps(
            {
                "ways": args.ways,
                "threads": args.threads,
                "repeats": args.repeats,
                "seconds_per_meta_step": medians,
                "ratio_to_floor": {k: v / medians["floor"] for k, v in medians.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
