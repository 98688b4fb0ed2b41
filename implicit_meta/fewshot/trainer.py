"""``train``: the meta-training run of ``implicit-meta train``, driven step by step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from implicit_meta.data import FewShotDataset, Splits
from implicit_meta.distributed import DistributedContext, init_distributed, launch_world_size
from implicit_meta.fewshot._run import Run, on_main, read_folder
from implicit_meta.fewshot.checks import check_world_size
from implicit_meta.fewshot.config import TrainConfig
from implicit_meta.fewshot.device import available_cpus, configure_threads, resolve_device
from implicit_meta.fewshot.evaluation import EvaluationResult
from implicit_meta.fewshot.meta_splits import load_splits

__all__ = ["TrainResult", "train"]


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
        >>> config = TrainConfig.smoke()
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
    splits: Splits[FewShotDataset] | None = None,
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
            one only as :func:`~implicit_meta.fewshot.config.check_resumable` allows (the
            settings are those of ``config``, never read back from the checkpoint).
        progress: Show tqdm bars (meta-training and evaluation) on stderr, on rank 0.
        splits: Meta-train / meta-test (/ validation) datasets to use instead of loading
            ``config.dataset``; without ``splits.val`` there is no validation.

    Returns:
        The outcome, with the evaluation if one was run (the same on every rank).

    Raises:
        FileExistsError: If ``out_dir`` already holds a checkpoint and ``resume`` is false.
        FileNotFoundError: If ``resume`` is true and there is no checkpoint.
        ValueError: If the resumed config changes
            what the run computes, the checkpoint was written by a different number of
            processes, or the meta-batch does not divide across the processes (raised before
            any process joins the group).
        implicit_meta.fewshot.CheckpointError: If the checkpoint to resume is not readable,
            or was written in another format (by another version of implicit-meta).
        implicit_meta.fewshot.DeviceUnavailableError: If CUDA is requested but absent.

    Example:
        >>> import tempfile, warnings
        >>> from implicit_meta.fewshot import TrainConfig, train
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> config = TrainConfig.smoke()
        >>> out = tempfile.mkdtemp()
        >>> result = train(config, out, progress=False)
        >>> sorted(p.name for p in result.out_dir.iterdir())[:3]
        ['checkpoint.pt', 'config.json', 'curves.png']
    """
    # The config checked its settings when it was made; the launch is checked here, before
    # anything is created or any process joins the group, so every rank raises the same error
    # at once instead of some ranks waiting forever for others.
    check_world_size(config, launch_world_size())
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


def _train(
    config: TrainConfig,
    out: Path,
    context: DistributedContext,
    device: torch.device,
    resume: bool,
    progress: bool,
    splits: Splits[FewShotDataset] | None,
) -> TrainResult:
    configure_threads(_threads(config, context, device))
    # Rank 0 checks the folder and reads the checkpoint before the data is loaded; every rank
    # gets the checkpoint, or rank 0's error.
    saved = on_main(lambda: read_folder(config, out, resume, context), context)
    if splits is None:
        splits = load_splits(
            config.dataset,
            config.root,
            config.protocol,
            val_classes=config.val_classes if config.val_episodes else 0,
            validation=config.val_episodes > 0,
        )
    with Run(config, out, splits, context=context, device=device, progress=progress) as run:
        if saved is not None:
            run.restore(saved)
        stopped_by = _meta_train(run)
        run.stop()
        run.checkpoint()
        scores = run.evaluate() if config.eval_episodes and stopped_by == "meta_steps" else None
    if scores is None:
        return TrainResult(out, run.steps_done, run.elapsed, stopped_by, None)
    evaluation, baseline, evaluated, evaluated_step = scores
    return TrainResult(
        out,
        run.steps_done,
        run.elapsed,
        stopped_by,
        evaluation,
        baseline,
        evaluated,
        evaluated_step,
    )


def _meta_train(run: Run) -> str:
    """Run meta-steps until ``meta_steps`` or the time budget; return which one stopped them.

    The model is validated at step 0 (the curve's first point and the first ``best.pt``),
    every ``val_every`` steps and at the end, and checkpointed every ``checkpoint_every``
    steps. Every rank runs this loop in lockstep: the stopping decision uses rank 0's clock,
    and the collectives (gradient averaging, logging, validation, checkpoints) fall on the same
    steps everywhere.
    """
    config = run.config
    if run.validating and run.steps_done == 0:
        run.validate()
    while run.steps_done < config.meta_steps:
        if run.out_of_time():
            return "time_budget"
        run.step()
        if run.validating and (
            run.steps_done % config.val_every == 0 or run.steps_done == config.meta_steps
        ):
            run.validate()
        if run.steps_done % config.checkpoint_every == 0:
            run.checkpoint()
    return "meta_steps"


def _threads(config: TrainConfig, context: DistributedContext, device: torch.device) -> int:
    if config.threads or not context.enabled or device.type != "cpu":
        return config.threads
    # Ranks on one machine share its cores; the load average lags behind ranks that have just
    # started, so it cannot tell them apart.
    return max(1, available_cpus() // context.local_world_size)
