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
import dataclasses
import inspect
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import implicit_meta as im
from implicit_meta.distributed import launch_rank, launch_world_size
from implicit_meta.fewshot.checkpoint import load_checkpoint
from implicit_meta.fewshot.config import DEVICES, TrainConfig, field_choices, field_type
from implicit_meta.fewshot.device import DeviceUnavailableError
from implicit_meta.fewshot.evaluation import EvaluationResult
from implicit_meta.fewshot.loading import evaluate_checkpoint, resolve_checkpoint
from implicit_meta.fewshot.run_files import CHECKPOINT_NAME
from implicit_meta.fewshot.trainer import train

__all__ = ["build_parser", "main"]

_PROG = "implicit-meta"
_DEFAULTS = TrainConfig()


def _field_docs(cls: type) -> dict[str, str]:
    """Each attribute's text in the ``Attributes:`` section of ``cls``'s docstring, one line.

    The command line's help comes from here, so that a :class:`TrainConfig` field is documented
    once, for the API reference and for ``--help`` alike.
    """
    doc = inspect.cleandoc(cls.__doc__ or "")
    section = doc.split("\nAttributes:\n", 1)[-1].split("\n\n", 1)[0]
    docs: dict[str, str] = {}
    name = ""
    for line in section.splitlines():
        entry = re.match(r"^ {4}(\w+): (.*)$", line)
        if entry:
            name, docs[entry.group(1)] = entry.group(1), entry.group(2)
        elif name and line.startswith(" " * 8):
            docs[name] += " " + line.strip()
    # Sphinx roles and literals read as plain words on a terminal.
    plain = {k: re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w.]+)`", r"\1", v) for k, v in docs.items()}
    # On the command line a field left None is a flag not given.
    unset = {k: re.sub(r"``None``", "unset", v) for k, v in plain.items()}
    return {k: v.replace("``", "").replace("%", "%%") for k, v in unset.items()}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field: name, type, choices and help from the field."""
    docs = _field_docs(TrainConfig)
    choices = field_choices()
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        default = getattr(_DEFAULTS, name)
        text = docs[name] + ("" if default is None else f" (default: {default})")
        flag = "--" + name.replace("_", "-")
        kind, _ = field_type(name)
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text)
        elif name in choices:
            parser.add_argument(flag, dest=name, choices=choices[name], help=text)
        else:
            parser.add_argument(flag, dest=name, type=kind, metavar=name.upper(), help=text)


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
    _add_config_flags(parser)
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
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
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
        >>> config = TrainConfig.smoke()
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
