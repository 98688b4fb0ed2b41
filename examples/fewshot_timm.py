"""Meta-train a timm backbone with iMAML on Omniglot or Mini-ImageNet (GPU when present).

Any model of ``timm.list_models()`` works through the spec ``timm:<name>``: it is created with
``timm.create_model(name, pretrained=False, num_classes=N, in_chans=C)`` and meta-trained
unchanged. Its BatchNorm layers normalise with batch statistics in train mode, which is how
the model is adapted and evaluated; meta-training never writes their running statistics.

Run:
    python examples/fewshot_timm.py                                  # Omniglot, resnet10t
    python examples/fewshot_timm.py --model mobilenetv3_small_050 --shots 1
    python examples/fewshot_timm.py --dataset mini-imagenet --root ~/data/mini-imagenet
    python examples/fewshot_timm.py --smoke                          # a few seconds (CI)
    python examples/fewshot_timm.py --out runs/timm --minutes 50     # a first GPU window,
    python examples/fewshot_timm.py --out runs/timm --minutes 50 --resume   # the next ones

``--minutes`` stops a call cleanly with a checkpoint; ``--resume`` continues it, and the run in
chunks equals one uninterrupted run. The run evaluates when it reaches ``--meta-steps``.
Afterwards, ``implicit-meta evaluate --checkpoint OUT/checkpoint.pt`` re-evaluates the run and
``implicit_meta.fewshot.load_meta_model`` rebuilds the model for your own tasks.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from implicit_meta.fewshot import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="a timm model name")
    parser.add_argument("--dataset", default="omniglot", choices=["omniglot", "mini-imagenet"])
    parser.add_argument("--root", default=None, help="dataset folder (Mini-ImageNet: required)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--meta-steps", type=int, default=2000, help="meta-steps of the run")
    parser.add_argument(
        "--minutes", type=float, default=0.0, help="stop this call after so many minutes (0: none)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    args = parser.parse_args()
    smoke = args.smoke or os.environ.get("IMPLICIT_META_SMOKE") == "1"

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = TrainConfig(
        dataset=args.dataset,
        root=args.root,
        backbone=f"timm:{args.model}",
        ways=args.ways,
        shots=args.shots,
        queries=15,
        inner_steps=5,
        inner_lr=0.05,
        reg=2.0,
        cg_steps=5,
        # More tasks per step on a GPU, where they are cheap; a CPU does fewer, faster steps.
        meta_batch=16 if device == "cuda" else 2,
        meta_lr=1e-3,
        meta_steps=args.meta_steps,
        time_budget=60.0 * args.minutes,
        eval_episodes=600,
        device=device,
    )
    if smoke:
        config = config.replace(
            ways=3, shots=1, queries=2, inner_steps=1, cg_steps=1, meta_batch=1, meta_steps=2,
            eval_episodes=2, val_episodes=2, threads=1,
        )  # fmt: skip
    out = args.out or tempfile.mkdtemp(prefix="fewshot-timm-")
    print(f"meta-training {config.backbone} on {config.dataset} ({device}); files in {out}")
    result = train(config, out, resume=args.resume, progress=not smoke)
    print(f"meta-trained {result.step} steps in {result.elapsed:.0f} s ({result.stopped_by})")
    if result.stopped_by == "time_budget":
        print(f"continue with: python examples/fewshot_timm.py --out {out} --resume")
    if result.evaluation is not None and result.baseline is not None:
        print(result.evaluation.summary())
        print(f"untrained initialisation, same episodes: {100 * result.baseline.accuracy:.2f}%")


if __name__ == "__main__":
    main()
