"""The ``implicit-meta`` command line: ``train`` and ``evaluate`` few-shot classifiers with iMAML.

Under ``torchrun`` the ``train`` command meta-trains on several processes (see
:func:`implicit_meta.fewshot.train`); only rank 0 prints and writes files.

Example:
    $ implicit-meta train --out runs/omniglot   # 5-way 5-shot Omniglot, < 10 min on a 2-core CPU
    $ torchrun --nproc_per_node=4 -m implicit_meta train --meta-batch 8 --out runs/omniglot-x4
    $ implicit-meta train --out runs/long --meta-steps 20000 --time-budget 3000  # a first chunk
    $ implicit-meta train --out runs/long --resume --time-budget 3000            # the next ones
    $ implicit-meta evaluate --checkpoint runs/omniglot --which best --json eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import implicit_meta as im
from implicit_meta.distributed import launch_rank, launch_world_size
from implicit_meta.fewshot.checkpoint import load_checkpoint
from implicit_meta.fewshot.checks import check_config
from implicit_meta.fewshot.config import (
    ADAPT_CHOICES,
    DATASETS,
    DEVICES,
    LR_SCHEDULES,
    PROTOCOLS,
    TASK_STRATEGIES,
    TrainConfig,
)
from implicit_meta.fewshot.device import DeviceUnavailableError
from implicit_meta.fewshot.evaluation import EvaluationResult
from implicit_meta.fewshot.loading import evaluate_checkpoint, resolve_checkpoint
from implicit_meta.fewshot.run_files import CHECKPOINT_NAME
from implicit_meta.fewshot.trainer import train
from implicit_meta.functional.curvature import CURVATURES
from implicit_meta.functional.hvp import HVP_MODES
from implicit_meta.models import list_backbones

__all__ = ["build_parser", "main"]

_PROG = "implicit-meta"
_DEFAULTS = TrainConfig()

# Flag -> (TrainConfig field, type, help). Defaults are SUPPRESSed in argparse so that the
# namespace holds only the flags the user typed: a resumed run keeps the checkpoint's values for
# everything else instead of silently falling back to the defaults.
_TRAIN_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--ways", "ways", int, "classes per task (N)"),
    ("--shots", "shots", int, "support images per class (K)"),
    ("--queries", "queries", int, "query images per class"),
    ("--backbone", "backbone", str, f"model: {', '.join(list_backbones())}"),
    (
        "--inner",
        "inner",
        str,
        "inner solver: a registered name or torch.optim.<Name> (default: sgd, or newton with "
        "--adapt head)",
    ),
    (
        "--inner-steps",
        "inner_steps",
        int,
        "inner solver steps per task (default: 5, or 8 Newton steps with --adapt head)",
    ),
    ("--inner-lr", "inner_lr", float, "inner learning rate (default: 0.1, or 1 with --adapt head)"),
    (
        "--reg",
        "reg",
        float,
        "proximal regularisation strength lambda (default: 1, or 0.5 with --adapt head)",
    ),
    (
        "--cg-steps",
        "cg_steps",
        int,
        "conjugate-gradient iterations per task; 0 is first-order, and unset it is first-order "
        "unless --curvature, --damping or --curvature-scale is given, then 5",
    ),
    ("--cg-tol", "cg_tol", float, "CG's relative residual tolerance"),
    ("--damping", "damping", float, "delta >= 0 added to the curvature's diagonal"),
    (
        "--curvature-scale",
        "curvature_scale",
        float,
        "factor on the curvature (to reproduce another code's system)",
    ),
    ("--meta-batch", "meta_batch", int, "tasks per meta-step"),
    ("--meta-steps", "meta_steps", int, "meta-steps of the run (the cosine spans them)"),
    ("--meta-lr", "meta_lr", float, "Adam learning rate of the meta-parameters"),
    (
        "--time-budget",
        "time_budget",
        float,
        "seconds of meta-training after which this call stops with a checkpoint, to be "
        "continued with --resume (0: none); never changes the result",
    ),
    (
        "--eval-episodes",
        "eval_episodes",
        int,
        "test episodes evaluated at the end, also for the untrained init (0: skip)",
    ),
    (
        "--val-classes",
        "val_classes",
        int,
        "Omniglot meta-train characters held out for validation",
    ),
    (
        "--val-episodes",
        "val_episodes",
        int,
        "validation episodes per validation; the best model is kept in best.pt (0: none)",
    ),
    ("--val-every", "val_every", int, "meta-steps between validations"),
    ("--seed", "seed", int, "seed of the initialisation and the task streams"),
    ("--threads", "threads", int, "CPU threads for torch (0: one per available core)"),
    ("--log-every", "log_every", int, "meta-steps between metrics.jsonl records"),
    ("--checkpoint-every", "checkpoint_every", int, "meta-steps between checkpoints"),
)


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="meta-train a few-shot classifier (default: 5-way 5-shot Omniglot, < 10 min on CPU)",
        description=(
            "Meta-train with iMAML, write DIR/checkpoint.pt, DIR/best.pt (best validation "
            "score), DIR/metrics.jsonl, DIR/curves.png, then evaluate the best checkpoint and "
            "the untrained initialisation on the same held-out episodes (DIR/evaluation.json). "
            "The same command gives the same checkpoint. Flags not given take the defaults "
            "shown, or the checkpoint's values with --resume."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        help=f"dataset (default: {_DEFAULTS.dataset})",
    )
    parser.add_argument(
        "--root",
        metavar="PATH",
        help="dataset folder (default: the embedded Omniglot; required for mini-imagenet)",
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, help=f"Omniglot split (default: {_DEFAULTS.protocol})"
    )
    parser.add_argument(
        "--device", choices=DEVICES, help=f"where to train (default: {_DEFAULTS.device})"
    )
    parser.add_argument(
        "--lr-schedule",
        dest="lr_schedule",
        choices=LR_SCHEDULES,
        help=(
            "meta learning rate: cosine decay from --meta-lr to 0 over --meta-steps, or "
            f"constant (default: {_DEFAULTS.lr_schedule})"
        ),
    )
    parser.add_argument(
        "--adapt",
        choices=ADAPT_CHOICES,
        help=(
            "what adapts per task: all parameters, or the classifier head on a shared body "
            "meta-learned through the exact implicit gradient (CG 20 unless --cg-steps is "
            "given); the head takes dense Newton steps unless --inner is given (default: "
            f"{_DEFAULTS.adapt})"
        ),
    )
    parser.add_argument(
        "--curvature",
        choices=CURVATURES,
        help=(
            "curvature of the meta-gradient's linear system: gauss_newton (positive "
            "semidefinite), hessian (exact at a stationary inner solution, indefinite on ReLU "
            f"networks), auto = gauss_newton for the cross-entropy (default: {_DEFAULTS.curvature})"
        ),
    )
    parser.add_argument(
        "--hvp",
        choices=HVP_MODES,
        help=f"Hessian-vector product strategy (default: {_DEFAULTS.hvp})",
    )
    parser.add_argument(
        "--task-strategy",
        dest="task_strategy",
        choices=TASK_STRATEGIES,
        help=(
            "solve a meta-batch's tasks vectorised (vmap) or one after another (loop); auto: "
            f"vmap on CUDA, the loop on the CPU (default: {_DEFAULTS.task_strategy})"
        ),
    )
    parser.add_argument(
        "--compile-inner",
        dest="compile_inner",
        action=argparse.BooleanOptionalAction,
        help=(
            "compile the inner objective with torch.compile: faster inner steps after a first "
            f"compilation of tens of seconds (default: {_DEFAULTS.compile_inner})"
        ),
    )
    for flag, field, kind, text in _TRAIN_FLAGS:
        default = getattr(_DEFAULTS, field)
        parser.add_argument(
            flag,
            dest=field,
            type=kind,
            metavar=field.upper(),
            help=text if default is None else f"{text} (default: {default})",
        )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="run folder (default: runs/<dataset>-<N>w<K>s-<date>-<time>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (same result as uninterrupted)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_evaluate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on held-out test episodes (mean accuracy, 95%% CI)",
        description=(
            "Adapt the meta-trained model to each test episode and report the mean query "
            "accuracy with its 95% confidence interval, 1.96 * std / sqrt(episodes), beside "
            "that of the run's untrained initialisation on the same episodes. The result is "
            "printed as text and as one JSON line on stdout."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint.pt or best.pt, or a run folder (then see --which)",
    )
    parser.add_argument(
        "--which",
        choices=("best", "last"),
        default="best",
        help=(
            "in a run folder: best.pt (best validation score; the last checkpoint if the run "
            "has no validation) or checkpoint.pt (default: best)"
        ),
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the untrained initialisation's score (halves the time)",
    )
    parser.add_argument("--episodes", type=int, default=600, help="test episodes (default: 600)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    parser.add_argument("--seed", type=int, default=None, help="episode seed (default: the run's)")
    parser.add_argument("--root", metavar="PATH", default=None, help="dataset folder override")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the JSON here")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads (default: 0, one per available core)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``implicit-meta`` (subcommands ``train`` and ``evaluate``).

    Returns:
        The parser.

    Example:
        >>> build_parser().parse_args(["evaluate", "--checkpoint", "c.pt"]).episodes
        600
    """
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Implicit-gradient meta-learning (iMAML) for few-shot learning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {im.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(subparsers)
    _add_evaluate(subparsers)
    return parser


def _train_config(args: argparse.Namespace, out: Path) -> TrainConfig:
    fields = {f for _, f, _, _ in _TRAIN_FLAGS} | {
        "dataset",
        "root",
        "protocol",
        "device",
        "lr_schedule",
        "task_strategy",
        "compile_inner",
        "curvature",
        "hvp",
        "adapt",
    }
    given = {k: v for k, v in vars(args).items() if k in fields}
    if getattr(args, "resume", False):
        # Start from the stored config so flags not given keep the checkpoint's values.
        if not (out / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(
                f"no checkpoint to resume at {out / CHECKPOINT_NAME}; "
                "start the run without --resume"
            )
        stored = TrainConfig.from_dict(load_checkpoint(out / CHECKPOINT_NAME)["config"])
        return stored.replace(**given)
    return TrainConfig(**given)


def _default_out(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.dataset}-{config.ways}w{config.shots}s-{stamp}"


def _run_train(args: argparse.Namespace) -> int:
    out_arg = getattr(args, "out", None)
    if getattr(args, "resume", False) and out_arg is None:
        raise ValueError("--resume needs --out DIR, the folder of the run to continue")
    config = _train_config(args, Path(out_arg) if out_arg else Path())
    check_config(config)  # before anything is printed or created
    out = Path(out_arg) if out_arg else _default_out(config)
    progress = not getattr(args, "no_progress", False)
    # Under torchrun every rank runs this; rank 0 speaks for all of them.
    main_process = launch_rank() == 0
    if main_process:
        world = launch_world_size()
        ranks = f" on {world} processes" if world > 1 else ""
        print(
            f"{_PROG}: training in {out}{ranks} with {json.dumps(config.to_dict())}",
            file=sys.stderr,
        )
    result = train(config, out, resume=getattr(args, "resume", False), progress=progress)
    if not main_process:
        return 0
    print(
        f"meta-trained {result.step} steps in {result.elapsed:.1f} s "
        f"(stopped by {result.stopped_by}); checkpoint: {out / CHECKPOINT_NAME}"
    )
    if result.stopped_by == "time_budget":
        print(
            f"stopped at step {result.step} of {config.meta_steps} by the time budget; "
            f"continue with: {_PROG} train --out {out} --resume"
        )
    if result.evaluation is not None:
        print(f"{result.evaluated} (step {result.evaluated_step}): {result.evaluation.summary()}")
        payload: dict[str, Any] = {
            **result.evaluation.to_dict(),
            "step": result.evaluated_step,
            "checkpoint": str(result.evaluated),
        }
        if result.baseline is not None:
            print(_baseline_line(result.evaluation, result.baseline))
            payload["baseline"] = result.baseline.to_dict()
        print(json.dumps(payload))
    return 0


def _baseline_line(trained: EvaluationResult, baseline: EvaluationResult) -> str:
    gain = 100 * (trained.accuracy - baseline.accuracy)
    margin = 100 * (trained.ci95 + baseline.ci95)
    verdict = "inside the noise" if abs(gain) <= margin else f"{gain:+.2f} points"
    return (
        f"untrained initialisation, same adaptation and episodes: {100 * baseline.accuracy:.2f}% "
        f"± {100 * baseline.ci95:.2f}%; meta-training: {verdict}"
    )


def _run_evaluate(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise ValueError(f"--episodes must be positive, got {args.episodes}")
    checkpoint = resolve_checkpoint(args.checkpoint, args.which)
    options: dict[str, Any] = {
        "episodes": args.episodes,
        "device": args.device,
        "seed": args.seed,
        "root": args.root,
        "threads": args.threads,
        "progress": not args.no_progress,
    }
    result, config = evaluate_checkpoint(checkpoint, **options)
    payload: dict[str, Any] = {
        **result.to_dict(),
        "dataset": config.dataset,
        "protocol": config.protocol,
        "backbone": config.backbone,
        "checkpoint": str(checkpoint),
    }
    print(f"{checkpoint}: {result.summary()}")
    if not args.no_baseline:
        baseline, _ = evaluate_checkpoint(checkpoint, initial=True, **options)
        payload["baseline"] = baseline.to_dict()
        print(_baseline_line(result, baseline))
    line = json.dumps(payload)
    print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(line + "\n", encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``implicit-meta`` with ``argv`` (default: ``sys.argv[1:]``).

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The exit status: 0 on success, 2 for a usage or input error (message on stderr),
        130 if interrupted.

    Example:
        >>> import tempfile, warnings
        >>> from implicit_meta.fewshot import TrainConfig, train
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> config = TrainConfig(backbone="conv4-8", ways=3, shots=1, queries=2,
        ...                      inner_steps=2, cg_steps=2, meta_batch=2, meta_steps=2,
        ...                      eval_episodes=4, val_episodes=0, threads=1, device="cpu")
        >>> out = tempfile.mkdtemp()
        >>> result = train(config, out, progress=False)
        >>> import contextlib, io
        >>> quiet = contextlib.redirect_stdout(io.StringIO())
        >>> with quiet, contextlib.redirect_stderr(io.StringIO()):
        ...     status = main(["evaluate", "--checkpoint", f"{out}/checkpoint.pt",
        ...                    "--episodes", "3", "--threads", "1"])
        >>> status
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _run_train(args)
        return _run_evaluate(args)
    except (DeviceUnavailableError, FileNotFoundError, FileExistsError, ValueError) as error:
        # Expected user errors get one clear line, not a traceback (per rank under torchrun).
        where = f" (rank {launch_rank()})" if launch_world_size() > 1 else ""
        print(f"{_PROG}: error{where}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{_PROG}: interrupted; continue from the last checkpoint with --resume",
            file=sys.stderr,
        )
        return 130
