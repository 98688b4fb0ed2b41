"""One meta-training run in its folder: its live objects, checkpoints, metrics, bar and scores."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]

from implicit_meta import __version__
from implicit_meta.data import EpisodeSampler, FewShotDataset, Splits
from implicit_meta.distributed import (
    DistributedContext,
    all_gather_objects,
    all_reduce_mean,
    average_gradients,
    broadcast_object,
    broadcast_parameters,
)
from implicit_meta.fewshot.builders import (
    build_lr_scheduler,
    build_meta_optimizer,
    build_model,
    initial_model,
)
from implicit_meta.fewshot.checkpoint import (
    CHECKPOINT_FORMAT,
    decode_json_tensor,
    encode_json_tensor,
    load_checkpoint,
    save_checkpoint,
)
from implicit_meta.fewshot.checks import check_model
from implicit_meta.fewshot.config import TrainConfig, check_resumable
from implicit_meta.fewshot.evaluation import EvaluationResult, episode_accuracies
from implicit_meta.fewshot.meta_batch import MetaBatchStats, meta_train_step
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

__all__ = ["FinalScores", "Run", "on_main", "read_folder"]

_T = TypeVar("_T")


class FinalScores(NamedTuple):
    """The held-out evaluation at the end of a run.

    Attributes:
        evaluation: The score of the selected checkpoint.
        baseline: The untrained initialisation under the same adaptation on the same episodes.
        checkpoint: The checkpoint scored: ``best.pt`` with validation, else ``checkpoint.pt``.
        step: Its meta-step.
    """

    evaluation: EvaluationResult
    baseline: EvaluationResult
    checkpoint: Path
    step: int


def on_main(work: Callable[[], _T], context: DistributedContext) -> _T:
    """Run ``work`` on rank 0; every rank gets its result or its error.

    Only rank 0 touches the run folder, so the other ranks (possibly on other machines) need
    no access to it, and an error there stops every rank instead of leaving them waiting.

    Args:
        work: What rank 0 does.
        context: This process's place in the process group.

    Returns:
        Rank 0's result, on every rank.
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


def read_folder(
    config: TrainConfig, out: Path, resume: bool, context: DistributedContext
) -> dict[str, Any] | None:
    """On rank 0: check ``out`` before anything is built, writing nothing; read its checkpoint.

    Args:
        config: The settings of this call.
        out: The run folder.
        resume: Whether this call continues ``out/checkpoint.pt``.
        context: This process's place in the process group.

    Returns:
        The checkpoint to resume with ``resume``, else None.

    Raises:
        FileExistsError: If ``out`` holds a checkpoint and ``resume`` is false.
        FileNotFoundError: If ``resume`` is true and there is no checkpoint.
        CheckpointError: If the checkpoint is not readable or of another format.
        ValueError: If ``config`` may not resume the checkpoint (see
            :func:`~implicit_meta.fewshot.config.check_resumable`), or another number of
            processes wrote it.
    """
    path = out / CHECKPOINT_NAME
    if not resume:
        if path.exists():
            raise FileExistsError(f"{path} exists; resume it or choose another output folder")
        return None
    saved = load_checkpoint(path)
    check_resumable(TrainConfig.from_dict(saved["config"]), config)
    stored_world = int(saved["world_size"])
    if stored_world != context.world_size:
        raise ValueError(
            f"{path} was written by a run of {stored_world} process(es); "
            f"resume it with {stored_world} (each holds its own episode stream)"
        )
    return saved


class Run:
    """One meta-training run in its folder, from the untrained model to the test score.

    It holds the model, its meta-optimizer (built from ``config``, the one home of the
    settings), the learning-rate schedule and this rank's episode stream, and owns the folder:
    the checkpoints, ``metrics.jsonl``, ``curves.png``, ``config.json``, ``evaluation.json``
    and the progress bar. A caller drives it with :meth:`restore`, :meth:`step`,
    :meth:`validate`, :meth:`checkpoint`, :meth:`out_of_time`, :meth:`stop` and
    :meth:`evaluate` (:func:`~implicit_meta.fewshot.train` is such a driver).

    Building it seeds torch's generator with ``config.seed``, builds the model (checked against
    the dataset's images before the folder exists), then creates the folder (rank 0): it clears
    the temporary files of a killed write and, when the folder holds no checkpoint, the
    metrics and ``best.pt`` of an attempt killed before its first checkpoint; and it writes
    ``config.json``.

    Every rank of a process group holds a run and calls its methods in the same order (they
    gather, reduce and broadcast); rank 0 alone writes files and shows progress. Leaving a
    ``with`` block closes the progress bar, however the block ends.

    Args:
        config: The run settings.
        out: The run folder; created if needed.
        splits: Meta-train, meta-test and (optional) validation classes; there is validation
            when ``splits.val`` is given and ``config.val_episodes`` > 0.
        context: This process's place in the process group.
        device: Where the model and the episodes live.
        progress: Show tqdm bars on stderr (on rank 0).

    Attributes:
        config: The run settings.
        out: The run folder.
        model: The meta-trained model (the meta-parameters).
        meta: Its meta-optimizer (inner problem, adjoint and Adam), built from ``config``.
        scheduler: The meta learning-rate schedule of ``meta.outer_optimizer``.
        sampler: This rank's stream of meta-train episodes.
        image_shape: ``(channels, height, width)`` of the dataset's images.
        device: Where the model and the episodes live.
        context: This process's place in the process group.
        log: The metrics log (rank 0), or None.
        steps_done: Meta-steps completed, before a resume included.
        elapsed: Seconds of meta-training so far, for the logs only (never in a checkpoint).
        best: The best validation score so far and its step, or None; in the checkpoint, so
            that a resumed run keeps the same ``best.pt`` as an uninterrupted one.
        scores: The final evaluation, once :meth:`evaluate` ran.
    """

    def __init__(
        self,
        config: TrainConfig,
        out: Path,
        splits: Splits[FewShotDataset],
        *,
        context: DistributedContext,
        device: torch.device,
        progress: bool,
    ) -> None:
        self.config = config
        self.out = out
        self.context = context
        self.device = device
        self.image_shape = splits.train.image_shape
        self._test = splits.test
        self._validation = splits.val if config.val_episodes > 0 else None
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.image_shape, device)
        # The backbone must take the dataset's images: checked before the folder exists, so
        # that a backbone that cannot leaves no folder behind and the error is one line.
        check_model(self.model, config, self.image_shape, device)
        on_main(self._create_folder, context)
        # Same seed, same initialisation on every rank in practice; the broadcast makes it
        # certain (e.g. for nondeterministic initialisers on some devices).
        broadcast_parameters(self.model, context)
        self.meta = build_meta_optimizer(self.model, config)
        self.scheduler = build_lr_scheduler(self.meta.outer_optimizer, config)
        self.sampler = EpisodeSampler(
            splits.train,
            config.ways,
            config.shots,
            config.queries,
            config.seed,
            device,
            rank=context.rank,
        )
        if context.enabled:
            # meta_train_step leaves each rank's task-mean gradient in p.grad; averaging them
            # just before Adam's step makes it the mean over the whole meta-batch on every rank.
            self.meta.outer_optimizer.register_step_pre_hook(
                lambda *_: average_gradients(self.model, context)
            )
        self.log = MetricsLog(out / METRICS_NAME) if context.is_main else None
        self.steps_done = 0
        self.elapsed = 0.0
        self.best: dict[str, float | int] | None = None
        self.scores: FinalScores | None = None
        self._title = _title(config)
        self._progress = progress and context.is_main
        self._bar: Any = None  # tqdm, created at its first use
        self._postfix: dict[str, str] = {}
        # The steps since the last metrics record: their summed statistics, count, last rate.
        self._totals: Tensor | None = None
        self._count = 0
        self._lr = self.lr
        self._start_clock()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def lr(self) -> float:
        """The meta learning rate of the next meta-step."""
        return float(self.meta.outer_optimizer.param_groups[0]["lr"])

    @property
    def validating(self) -> bool:
        """Whether the run scores validation episodes (and keeps ``best.pt``)."""
        return self._validation is not None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: parameters, Adam's state, schedule, best score, streams.

        The settings are never read from the checkpoint: the meta-optimizer was built from this
        run's config, which :func:`read_folder` compared with the checkpoint's, so a setting
        that may change on resume (``compile_inner``) takes effect. Records ``metrics.jsonl``
        holds beyond the checkpoint's step are dropped (they are about to be recomputed), and
        ``elapsed`` continues from its last record.

        Args:
            state: A checkpoint written by :meth:`checkpoint` (as
                :func:`~implicit_meta.fewshot.checkpoint.load_checkpoint` returns it).

        Raises:
            ValueError: If the checkpoint was trained on images of another shape.
        """
        if tuple(state["image_shape"]) != self.image_shape:
            raise ValueError(
                f"the checkpoint was trained on images of shape {state['image_shape']}, "
                f"the dataset has {list(self.image_shape)}"
            )
        self.model.load_state_dict(state["model"])
        self.meta.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.steps_done = int(state["step"])
        self.best = dict(state["best"]) or None
        streams = state["ranks"][self.context.rank]
        self.sampler.load_state_dict(decode_json_tensor(streams["sampler"]))
        torch.set_rng_state(streams["torch_rng"].cpu())
        if self.device.type == "cuda" and streams["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in streams["cuda_rng"]])
        logged: list[float] = []
        if self.log is not None:
            self.log.truncate_after(self.steps_done)
            logged = [float(r["elapsed"]) for r in read_metrics(self.log.path) if "elapsed" in r]
        # Total training time so far, for the logs only: the checkpoint holds no clock.
        self.elapsed = broadcast_object(logged[-1] if logged else 0.0, self.context)
        self._lr = self.lr
        self._start_clock()

    def out_of_time(self) -> bool:
        """Whether this call has spent ``config.time_budget``; every rank gets rank 0's answer.

        Never before this call's first meta-step, so that every call makes progress. The clock
        decides only whether the next step runs, never what it computes.

        Returns:
            True if the call should stop here (with a checkpoint, to be resumed).
        """
        self.elapsed = self._clock()
        budget = self.config.time_budget
        started = self.steps_done > self._first_step
        return bool(budget) and started and self.elapsed - self._base >= budget

    def step(self) -> None:
        """One meta-step on this rank's share of a meta-batch, then the learning-rate schedule.

        Every ``log_every`` steps the means since the previous record go to ``metrics.jsonl``
        (averaged over the ranks) and to the progress bar.
        """
        config = self.config
        self._lr = self.lr
        batch = self.sampler.sample(config.meta_batch // self.context.world_size)
        stats = meta_train_step(self.meta, batch, config.task_strategy).stacked()
        self.scheduler.step()
        self._totals = stats if self._totals is None else self._totals + stats
        self._count += 1
        self.steps_done += 1
        bar = self._progress_bar()
        bar.update(1)
        if self.steps_done % config.log_every == 0:
            record = self._log_steps()
            seconds = max(self.elapsed - self._base, 1e-9)
            done = self.steps_done - self._first_step
            self._postfix.update(
                loss=f"{record['outer_loss']:.3f}",
                acc=f"{record['query_accuracy']:.3f}",
                lr=f"{self._lr:.1e}",
                tasks_s=f"{done * config.meta_batch / seconds:.1f}",
                # Relative values (see MetaBatchStats) and the share of tasks whose CG met
                # non-positive curvature: what says whether the meta-gradient can be trusted.
                stat=f"{record['relative_stationarity']:.2g}",
                res=f"{record['relative_cg_residual']:.2g}",
                npc=f"{record['status_share.NONPOSITIVE_CURVATURE']:.0%}",
            )
            bar.set_postfix(self._postfix)

    def validate(self) -> EvaluationResult:
        """Score the current model on the validation episodes; keep it in best.pt if it is best.

        best.pt is written before the checkpoint that records the new best: a kill in between
        resumes from an older checkpoint, which validates this step again and rewrites the
        same best.pt. The score is logged as its own record.

        Returns:
            The validation score of the current model (the same on every rank).

        Raises:
            ValueError: If the run does not validate (see :attr:`validating`).
        """
        if self._validation is None:
            raise ValueError("this run has no validation (val_episodes is 0 or no val split)")
        self.elapsed = self._clock()
        result = self._score(self._validation, self.model, self.config.val_episodes, False)
        if self.best is None or result.accuracy > float(self.best["accuracy"]):
            self.best = {"step": self.steps_done, "accuracy": result.accuracy}
            state = self._state()
            if state is not None:
                save_checkpoint(state, self.out / BEST_NAME)
        if self.log is not None:
            self.log.append(
                {
                    "step": self.steps_done,
                    "elapsed": round(self.elapsed, 3),
                    "val_accuracy": result.accuracy,
                    "val_ci95": result.ci95,
                }
            )
        self._postfix["val"] = f"{result.accuracy:.3f}"
        self._progress_bar().set_postfix(self._postfix)
        return result

    def stop(self) -> None:
        """End this call's meta-training: close the bar, log the steps since the last record."""
        self._progress_bar().close()
        self.elapsed = self._clock()
        if self._totals is not None and self._count:
            self._log_steps()

    def checkpoint(self) -> None:
        """Write ``checkpoint.pt`` and redraw ``curves.png`` (rank 0); every rank must call it.

        The checkpoint holds the config (the run's one record of its settings), the model,
        Adam's state, the schedule, the best validation score, every rank's random streams and
        the step; nothing in it depends on the clock, so the same run gives the same bytes.
        """
        state = self._state()
        if state is not None:
            save_checkpoint(state, self.out / CHECKPOINT_NAME)
            self._plot()

    def evaluate(self) -> FinalScores:
        """Score the selected checkpoint and the untrained start on the same test episodes.

        The checkpoint is ``best.pt`` when the run validated, else the current model (that of
        ``checkpoint.pt``); the baseline is the initialisation rebuilt from ``config.seed``.
        Each rank scores its share of ``config.eval_episodes``. Rank 0 writes
        ``evaluation.json`` and redraws the curves with both accuracies.

        Returns:
            Both scores and the checkpoint scored (the same on every rank).
        """
        config = self.config
        checkpoint, step, model = self._selected()
        evaluation = self._score(self._test, model, config.eval_episodes, self._progress)
        start = initial_model(config, self.image_shape, self.device)
        broadcast_parameters(start, self.context)
        baseline = self._score(self._test, start, config.eval_episodes, self._progress)
        self.scores = FinalScores(evaluation, baseline, checkpoint, step)
        if self.context.is_main:
            summary = {
                **evaluation.to_dict(),
                "step": step,
                "checkpoint": str(checkpoint),
                "baseline": baseline.to_dict(),
                "gain": evaluation.accuracy - baseline.accuracy,
                "best": self.best,
            }
            text = json.dumps(summary, indent=2) + "\n"
            (self.out / EVALUATION_NAME).write_text(text, "utf-8")
            self._plot()
        return self.scores

    def _create_folder(self) -> None:
        """On rank 0: create the folder, clear what killed attempts left, write config.json."""
        self.out.mkdir(parents=True, exist_ok=True)
        # Temp files of a write (checkpoint, best.pt, curves) killed before its rename; the
        # files they were meant to replace are intact.
        for stale in self.out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        if not (self.out / CHECKPOINT_NAME).exists():
            # An attempt killed before its first checkpoint: its records and best.pt belong to
            # no checkpoint. (With a checkpoint, restore() truncates the records.)
            (self.out / METRICS_NAME).unlink(missing_ok=True)
            (self.out / BEST_NAME).unlink(missing_ok=True)
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        (self.out / CONFIG_NAME).write_text(text, "utf-8")

    def _start_clock(self) -> None:
        self._started = time.perf_counter()
        self._base = self.elapsed
        self._first_step = self.steps_done

    def _clock(self) -> float:
        """Seconds of meta-training so far, rank 0's on every rank (a collective)."""
        return broadcast_object(self._base + time.perf_counter() - self._started, self.context)

    def _progress_bar(self) -> Any:
        if self._bar is None:
            self._bar = tqdm(
                total=self.config.meta_steps,
                initial=self.steps_done,
                desc="meta-train",
                unit="step",
                disable=not self._progress,
                dynamic_ncols=True,
            )
        return self._bar

    def _log_steps(self) -> dict[str, Any]:
        """Log the means of the steps since the last record (averaged over the ranks)."""
        assert self._totals is not None  # called after a step
        self.elapsed = self._clock()
        totals = all_reduce_mean(self._totals, self.context)
        record = _metrics_record(self.steps_done, self.elapsed, totals, self._count, self._lr)
        if self.log is not None:
            self.log.append(record)
        self._totals, self._count = None, 0
        return record

    def _rank_state(self) -> dict[str, Any]:
        """The random streams of this rank: its episode sampler and torch's generators."""
        cuda_rng: list[Tensor] = []
        if self.device.type == "cuda":
            cuda_rng = list(torch.cuda.get_rng_state_all())
        return {
            "sampler": encode_json_tensor(self.sampler.state_dict()),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
        }

    def _state(self) -> dict[str, Any] | None:
        """The checkpoint, on rank 0 (None elsewhere); every rank must call it (it gathers).

        The model and Adam's state are the same on every rank; the random streams are not, so
        ``ranks`` holds each rank's (the top-level ``sampler``/``torch_rng``/``cuda_rng`` are
        rank 0's, the layout of a single-process checkpoint).
        """
        mine = self._rank_state()
        ranks = all_gather_objects(mine, self.context)
        if not self.context.is_main:
            return None
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "image_shape": list(self.image_shape),
            "step": self.steps_done,
            "model": self.model.state_dict(),
            "outer_optimizer": self.meta.outer_optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "best": dict(self.best) if self.best is not None else {},
            **mine,
            "world_size": self.context.world_size,
            "ranks": ranks,
            "versions": {"implicit_meta": __version__, "torch": str(torch.__version__)},
        }

    def _score(
        self, dataset: FewShotDataset, model: nn.Module, episodes: int, progress: bool
    ) -> EvaluationResult:
        """Each rank scores its share of ``episodes`` of ``dataset``; the summary covers all.

        The episodes depend only on the seed and the dataset, so every model scored on a
        dataset (the meta-trained one, the best one, the untrained one) sees the same tasks.
        """
        config, context = self.config, self.context
        share = episodes // context.world_size + (context.rank < episodes % context.world_size)
        sampler = EpisodeSampler(
            dataset,
            config.ways,
            config.shots,
            config.queries,
            config.seed,
            self.device,
            rank=context.rank,
        )
        meta = self.meta if model is self.model else build_meta_optimizer(model, config)
        mine = episode_accuracies(meta, sampler, share, progress=progress)
        values = [value for part in all_gather_objects(mine, context) for value in part]
        return EvaluationResult.from_accuracies(values, config.ways, config.shots)

    def _selected(self) -> tuple[Path, int, nn.Module]:
        """The checkpoint the final evaluation scores (the best validated one, else the last).

        Returns:
            Its path, its meta-step, and its model (on every rank).
        """
        if not self.validating or self.best is None:
            return self.out / CHECKPOINT_NAME, self.steps_done, self.model
        best_step = int(self.best["step"])
        if best_step == self.steps_done:  # best.pt holds the current parameters
            return self.out / BEST_NAME, best_step, self.model
        state: dict[str, Tensor] | None = None
        if self.context.is_main:
            state = load_checkpoint(self.out / BEST_NAME)["model"]
        state = broadcast_object(state, self.context)
        model = build_model(self.config, self.image_shape, self.device)
        assert state is not None  # every rank has rank 0's copy
        model.load_state_dict(state)
        return self.out / BEST_NAME, best_step, model

    def _plot(self) -> None:
        """Redraw ``curves.png`` from the metrics log (rank 0), with the test scores if any."""
        assert self.log is not None  # rank 0
        plot_curves(
            read_metrics(self.log.path),
            self.out / CURVES_NAME,
            test_accuracy=self.scores.evaluation.accuracy if self.scores else None,
            baseline_accuracy=self.scores.baseline.accuracy if self.scores else None,
            title=self._title,
        )


def _metrics_record(
    step: int, elapsed: float, totals: Tensor, count: int, lr: float
) -> dict[str, Any]:
    """The metrics record of the ``count`` meta-steps up to ``step``: their means and the rate.

    Args:
        step: Meta-steps completed.
        elapsed: Seconds of meta-training so far.
        totals: The sums of :meth:`MetaBatchStats.stacked` over those steps.
        count: How many steps ``totals`` sums.
        lr: The meta learning rate of the last of them.

    Returns:
        ``step``, ``elapsed``, each statistic of :meth:`MetaBatchStats.names` and ``meta_lr``.
    """
    # One device-to-host transfer per logged step; the steps in between never sync for logging.
    means = (totals / count).tolist()
    record: dict[str, Any] = {"step": step, "elapsed": round(elapsed, 3)}
    record.update(zip(MetaBatchStats.names(), means, strict=True))
    record["meta_lr"] = lr
    return record


def _title(config: TrainConfig) -> str:
    """The title of ``curves.png``: the dataset, the task and the settings that matter most."""
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
