"""The meta-training loop: episodes in, checkpoints, metrics, curves and a test score out."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]

from implicit_meta.data import EpisodeSampler, FewShotDataset
from implicit_meta.distributed import (
    DistributedContext,
    all_reduce_mean,
    average_gradients,
    broadcast_object,
    broadcast_parameters,
    init_distributed,
    launch_world_size,
)
from implicit_meta.fewshot._run_evaluation import evaluate, selected_model, validate
from implicit_meta.fewshot._run_state import Run, metrics_record
from implicit_meta.fewshot.builders import (
    build_lr_scheduler,
    build_meta_optimizer,
    build_model,
    initial_model,
)
from implicit_meta.fewshot.checkpoint import load_checkpoint
from implicit_meta.fewshot.checks import check_config, check_model, check_world_size
from implicit_meta.fewshot.config import TrainConfig, check_resumable
from implicit_meta.fewshot.device import available_cpus, configure_threads, resolve_device
from implicit_meta.fewshot.evaluation import EvaluationResult
from implicit_meta.fewshot.meta_batch import meta_train_step
from implicit_meta.fewshot.meta_splits import FewShotSplits, load_splits
from implicit_meta.fewshot.metrics import MetricsLog, read_metrics
from implicit_meta.fewshot.plots import plot_curves
from implicit_meta.fewshot.run_files import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    CURVES_NAME,
    EVALUATION_NAME,
    METRICS_NAME,
)

# The run-file names and the checks live in run_files, checks and config; they stay importable
# from here, where they were first defined.
__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "CURVES_NAME",
    "EVALUATION_NAME",
    "METRICS_NAME",
    "TrainResult",
    "check_config",
    "check_resumable",
    "check_world_size",
    "train",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class TrainResult:
    """What a call of :func:`train` did.

    Attributes:
        out_dir: The run folder (checkpoints, metrics, curves, evaluation).
        step: Meta-steps completed in total (including those before a resume).
        elapsed: Seconds spent meta-training in total, over every call that continued the run
            (data loading, validation and evaluation excluded); informational only.
        stopped_by: ``"meta_steps"`` (the run is complete) or ``"time_budget"`` (this call
            stopped early with a checkpoint; ``resume`` continues it and nothing is
            evaluated yet).
        evaluation: The held-out evaluation of the selected checkpoint, or None if
            ``eval_episodes`` was 0 or the run is not complete.
        baseline: The untrained initialisation under the same adaptation on the same
            episodes, or None when ``evaluation`` is None.
        evaluated: The checkpoint ``evaluation`` scores: ``best.pt`` (the best validation
            score) when validation is on, else ``checkpoint.pt``; None when not evaluated.
        evaluated_step: The meta-step of that checkpoint.

    Example:
        >>> import tempfile, warnings
        >>> from implicit_meta.fewshot import TrainConfig, train
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> config = TrainConfig(backbone="conv4-8", ways=3, shots=1, queries=2,
        ...                      inner_steps=2, cg_steps=2, meta_batch=2, meta_steps=2,
        ...                      eval_episodes=4, val_episodes=0, threads=1, device="cpu")
        >>> out = tempfile.mkdtemp()
        >>> result = train(config, out, progress=False)
        >>> result.stopped_by, result.step, result.evaluation.episodes
        ('meta_steps', 2, 4)
    """

    out_dir: Path
    step: int
    elapsed: float
    stopped_by: str
    evaluation: EvaluationResult | None
    baseline: EvaluationResult | None = None
    evaluated: Path | None = None
    evaluated_step: int | None = None


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    splits: FewShotSplits | None = None,
) -> TrainResult:
    """Meta-train a few-shot classifier with iMAML, then evaluate it on held-out classes.

    Each meta-step draws ``meta_batch`` N-way K-shot episodes from the meta-train classes, adapts
    the model to every support set with the inner solver, and steps Adam on the task-mean
    implicit meta-gradient of the query cross-entropy; the learning rate follows
    ``config.lr_schedule`` by meta-step
    (:func:`~implicit_meta.fewshot.builders.build_lr_scheduler`).
    With ``val_episodes`` > 0 the model is scored on validation classes at the start, every
    ``val_every`` steps and at the end, and the best-scoring state is kept in ``best.pt``.
    After ``meta_steps`` steps the selected checkpoint (``best.pt`` with validation, else the
    last) and the untrained initialisation are scored on the same ``eval_episodes`` test
    episodes under the same adaptation, so the gain from meta-learning is in every result.

    ``time_budget`` stops a call cleanly after that many seconds of meta-training, with a
    checkpoint and without evaluating; resuming continues it. The clock decides only where a
    call stops, never what is computed, so a run done in several budgeted calls ends with the
    same checkpoint as an uninterrupted run.

    Files in ``out_dir``: ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end,
    written atomically), ``best.pt`` (with validation), ``metrics.jsonl`` (every
    ``log_every`` steps: means over the steps since the previous record, and the learning rate;
    validation scores as their own records), ``curves.png``, ``config.json`` and
    ``evaluation.json``.

    Determinism: the checkpoint holds the model, Adam's state, the scheduler, the best
    validation score, the episode streams, torch's random state and the step, and nothing that
    depends on the clock. On the same device and thread count, the same config gives the same
    checkpoint bytes, and a run killed at any point (even during a checkpoint write, which is
    atomic) and resumed gives the uninterrupted run's final checkpoint.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join a process group (``nccl`` on
    GPUs, ``gloo`` on CPUs), start from rank 0's parameters, and each draws ``meta_batch /
    world_size`` tasks per step from its own episode stream (seeded by ``seed`` and its rank).
    Their meta-gradients are averaged with one ``all_reduce`` before every rank takes the same
    Adam step, so the parameters stay identical. Rank 0 alone writes files and shows progress;
    its checkpoint holds every rank's random streams, so a run resumes with the same number of
    processes. Validation and test episodes are split across the ranks and the accuracies
    gathered, so the summaries cover all of them.

    Global state: seeds torch's generator with ``config.seed``, sets torch's CPU thread count
    (``config.threads``; with ``0``, the cores available to the process, shared among the
    ranks on the machine), and creates and destroys the default process group under
    ``torchrun`` unless one exists.

    Args:
        config: The run settings.
        out_dir: Run folder, created if needed (by rank 0).
        resume: Continue from ``out_dir/checkpoint.pt``; ``config`` may differ from the stored
            one only as :func:`check_resumable` allows.
        progress: Show tqdm bars (meta-training and evaluation) on stderr, on rank 0.
        splits: Meta-train / meta-test (/ validation) datasets to use instead of loading
            ``config.dataset``; without ``splits.val`` there is no validation.

    Returns:
        The outcome, with the evaluation if one was run (the same on every rank).

    Raises:
        FileExistsError: If ``out_dir`` already holds a checkpoint and ``resume`` is false.
        FileNotFoundError: If ``resume`` is true and there is no checkpoint.
        ValueError: If the resumed config changes what the run computes, the checkpoint was
            written by a different number of processes, or the meta-batch does not divide
            across the processes (raised before any process joins the group).
        implicit_meta.fewshot.DeviceUnavailableError: If CUDA is requested but absent.

    Example:
        >>> import tempfile, warnings
        >>> from implicit_meta.fewshot import TrainConfig, train
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> config = TrainConfig(backbone="conv4-8", ways=3, shots=1, queries=2,
        ...                      inner_steps=2, cg_steps=2, meta_batch=2, meta_steps=2,
        ...                      eval_episodes=4, val_episodes=0, threads=1, device="cpu")
        >>> out = tempfile.mkdtemp()
        >>> result = train(config, out, progress=False)
        >>> sorted(p.name for p in result.out_dir.iterdir())[:3]
        ['checkpoint.pt', 'config.json', 'curves.png']
    """
    # Checked before joining the group: every rank raises the same error at once instead of
    # some ranks waiting forever for others.
    check_world_size(config, launch_world_size())
    check_config(config)
    device = resolve_device(config.device)
    owns_group = launch_world_size() > 1 and not dist.is_initialized()
    context = init_distributed(config.device)
    try:
        if context.enabled:
            device = context.device
        return _train(config, Path(out_dir), context, device, resume, progress, splits)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _threads(config: TrainConfig, context: DistributedContext, device: torch.device) -> int:
    if config.threads or not context.enabled or device.type != "cpu":
        return config.threads
    # Ranks on one machine share its cores; the load average lags behind ranks that have just
    # started, so it cannot tell them apart.
    return max(1, available_cpus() // context.local_world_size)


def _prepare_output(
    config: TrainConfig, out: Path, resume: bool, context: DistributedContext
) -> dict[str, Any] | None:
    """On rank 0: check ``out``, writing nothing; return the checkpoint to resume, if any."""
    checkpoint_path = out / CHECKPOINT_NAME
    saved: dict[str, Any] | None = None
    if resume:
        saved = load_checkpoint(checkpoint_path)
        check_resumable(TrainConfig.from_dict(saved["config"]), config)
        stored_world = int(saved.get("world_size", 1))
        if stored_world != context.world_size:
            raise ValueError(
                f"{checkpoint_path} was written by a run of {stored_world} process(es); "
                f"resume it with {stored_world} (each holds its own episode stream)"
            )
    elif checkpoint_path.exists():
        raise FileExistsError(
            f"{checkpoint_path} exists; resume it or choose another output folder"
        )
    return saved


def _create_output(out: Path) -> None:
    """On rank 0: create ``out`` and clear what a killed write left in it."""
    out.mkdir(parents=True, exist_ok=True)
    # Temp files of a write (checkpoint, best.pt, curves) killed before its rename; the files
    # they were meant to replace are intact.
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _prepare_everywhere(
    config: TrainConfig, out: Path, resume: bool, context: DistributedContext
) -> dict[str, Any] | None:
    """Rank 0 checks ``out`` and reads the checkpoint; every rank gets it or rank 0's error."""
    return _on_main(lambda: _prepare_output(config, out, resume, context), context)


def _on_main(work: Callable[[], _T], context: DistributedContext) -> _T:
    """Run ``work`` on rank 0; every rank gets its result or its error.

    Only rank 0 touches the run folder, so the other ranks (possibly on other machines) need
    no access to it, and an error there stops every rank instead of leaving them waiting.
    """
    outcome: _T | BaseException | None = None
    if context.is_main:
        try:
            outcome = work()
        except Exception as error:  # any failure must reach the other ranks too
            if not context.enabled:
                raise
            outcome = error
    outcome = broadcast_object(outcome, context)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome  # type: ignore[return-value]  # rank 0's result


def _train(
    config: TrainConfig,
    out: Path,
    context: DistributedContext,
    device: torch.device,
    resume: bool,
    progress: bool,
    splits: FewShotSplits | None,
) -> TrainResult:
    checkpoint_path = out / CHECKPOINT_NAME
    configure_threads(_threads(config, context, device))
    progress = progress and context.is_main
    saved = _prepare_everywhere(config, out, resume, context)
    if splits is None:
        splits = load_splits(
            config.dataset,
            config.root,
            config.protocol,
            val_classes=config.val_classes if config.val_episodes else 0,
            validation=config.val_episodes > 0,
        )

    torch.manual_seed(config.seed)
    image_shape = splits.train.image_shape
    model = build_model(config, image_shape, device)
    # The backbone must take the dataset's images: checked here, before the run folder exists,
    # so that a backbone that cannot leaves no folder behind and the error is one line.
    check_model(model, config, image_shape, device)
    _on_main(lambda: _create_output(out), context)
    # Same seed, same initialisation on every rank in practice; the broadcast makes it certain
    # (e.g. for nondeterministic initialisers on some devices).
    broadcast_parameters(model, context)
    meta = build_meta_optimizer(model, config)
    run = Run(
        config=config,
        model=model,
        meta=meta,
        scheduler=build_lr_scheduler(meta.outer_optimizer, config),
        sampler=EpisodeSampler(
            splits.train,
            config.ways,
            config.shots,
            config.queries,
            config.seed,
            device,
            rank=context.rank,
        ),
        image_shape=image_shape,
        device=device,
        context=context,
    )
    if context.enabled:
        # meta_train_step leaves each rank's task-mean gradient in p.grad; averaging them just
        # before Adam's step makes it the mean over the whole meta-batch on every rank.
        run.meta.outer_optimizer.register_step_pre_hook(
            lambda *_: average_gradients(run.model, context)
        )
    log = MetricsLog(out / METRICS_NAME) if context.is_main else None
    if saved is not None:
        run.restore(saved)
        if log is not None:
            # Records logged after the checkpoint are about to be recomputed.
            log.truncate_after(run.step)
        # Total training time so far, for the logs only: the checkpoint holds no clock.
        logged = [r["elapsed"] for r in read_metrics(out / METRICS_NAME) if "elapsed" in r]
        run.elapsed = broadcast_object(float(logged[-1]) if logged else 0.0, context)
    elif log is not None:
        log.path.unlink(missing_ok=True)
        (out / BEST_NAME).unlink(missing_ok=True)
    if context.is_main:
        (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", "utf-8")

    validation = splits.val if config.val_episodes > 0 else None
    stopped_by = _meta_train(run, log, out, validation, progress)
    run.checkpoint(checkpoint_path)

    evaluation = baseline = None
    evaluated: Path | None = None
    evaluated_step: int | None = None
    if config.eval_episodes > 0 and stopped_by == "meta_steps":
        evaluated, evaluated_step, selected = selected_model(run, out, validation is not None)
        evaluation = evaluate(run, splits.test, selected, config.eval_episodes, progress)
        start = initial_model(config, image_shape, device)
        broadcast_parameters(start, context)
        baseline = evaluate(run, splits.test, start, config.eval_episodes, progress)
        if context.is_main:
            summary = {
                **evaluation.to_dict(),
                "step": evaluated_step,
                "checkpoint": str(evaluated),
                "baseline": baseline.to_dict(),
                "gain": evaluation.accuracy - baseline.accuracy,
                "best": run.best,
            }
            (out / EVALUATION_NAME).write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    if log is not None:
        plot_curves(
            read_metrics(log.path),
            out / CURVES_NAME,
            test_accuracy=evaluation.accuracy if evaluation else None,
            baseline_accuracy=baseline.accuracy if baseline else None,
            title=_title(config),
        )
    return TrainResult(
        out, run.step, run.elapsed, stopped_by, evaluation, baseline, evaluated, evaluated_step
    )


def _title(config: TrainConfig) -> str:
    problem = config.inner_problem()
    return (
        f"iMAML {config.dataset} {config.ways}-way {config.shots}-shot, {config.backbone}, "
        f"adapt {config.adapt}, {problem.solver} x{problem.steps}, {_adjoint_words(config)}"
    )


def _adjoint_words(config: TrainConfig) -> str:
    adjoint = config.adjoint()
    if adjoint.first_order:
        return f"reg {config.proximal_reg:g}, first-order"
    # "auto" is Gauss-Newton here: the trainer's inner loss is an output_loss.
    curvature = "gauss_newton" if config.curvature == "auto" else config.curvature
    return adjoint.replace(curvature=curvature).describe()


def _meta_train(
    run: Run,
    log: MetricsLog | None,
    out: Path,
    validation: FewShotDataset | None,
    progress: bool,
) -> str:
    """Run meta-steps until ``meta_steps`` or the time budget; return which one stopped it.

    Every rank runs this loop in lockstep: the stopping decision uses rank 0's clock, and the
    collectives (gradient averaging, logging, validation, checkpoints) fall on the same steps
    everywhere. The clock decides only whether the next step runs, never its arithmetic.
    """
    config, context = run.config, run.context
    checkpoint_path = out / CHECKPOINT_NAME
    totals: Tensor | None = None
    count = 0
    stopped_by = "meta_steps"
    start, base, first_step = time.perf_counter(), run.elapsed, run.step
    tasks_per_rank = config.meta_batch // context.world_size

    def clock() -> float:
        return broadcast_object(base + time.perf_counter() - start, context)

    lr = run.lr
    postfix: dict[str, str] = {}
    if validation is not None and run.step == 0:
        # The untrained model's score: the curve's step-0 point and the first best.pt.
        postfix["val"] = f"{validate(run, log, out, validation).accuracy:.3f}"
    bar = tqdm(
        total=config.meta_steps,
        initial=run.step,
        desc="meta-train",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        while run.step < config.meta_steps:
            run.elapsed = clock()
            # Checked from the second step of a call on, so that every call makes progress.
            spent = run.elapsed - base
            if config.time_budget and run.step > first_step and spent >= config.time_budget:
                stopped_by = "time_budget"
                break
            lr = run.lr
            batch = run.sampler.sample(tasks_per_rank)
            stats = meta_train_step(run.meta, batch, config.task_strategy).stacked()
            run.scheduler.step()
            totals = stats if totals is None else totals + stats
            count += 1
            run.step += 1
            bar.update(1)
            if run.step % config.log_every == 0 and totals is not None:
                run.elapsed = clock()
                record = metrics_record(
                    run.step, run.elapsed, all_reduce_mean(totals, context), count, lr
                )
                if log is not None:
                    log.append(record)
                seconds = max(run.elapsed - base, 1e-9)
                postfix.update(
                    loss=f"{record['outer_loss']:.3f}",
                    acc=f"{record['query_accuracy']:.3f}",
                    lr=f"{lr:.1e}",
                    tasks_s=f"{(run.step - first_step) * config.meta_batch / seconds:.1f}",
                    # Relative values (see MetaBatchStats) and the share of tasks whose CG met
                    # non-positive curvature: what says whether the meta-gradient can be trusted.
                    stat=f"{record['relative_stationarity']:.2g}",
                    res=f"{record['relative_cg_residual']:.2g}",
                    npc=f"{record['status_share.NONPOSITIVE_CURVATURE']:.0%}",
                )
                bar.set_postfix(postfix)
                totals, count = None, 0
            if validation is not None and (
                run.step % config.val_every == 0 or run.step == config.meta_steps
            ):
                run.elapsed = clock()
                postfix["val"] = f"{validate(run, log, out, validation).accuracy:.3f}"
                bar.set_postfix(postfix)
            if run.step % config.checkpoint_every == 0:
                run.checkpoint(checkpoint_path)
                if log is not None:
                    plot_curves(read_metrics(log.path), out / CURVES_NAME)
    run.elapsed = clock()
    if totals is not None and count:
        record = metrics_record(run.step, run.elapsed, all_reduce_mean(totals, context), count, lr)
        if log is not None:
            log.append(record)
    return stopped_by
