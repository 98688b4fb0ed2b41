"""Scoring a run: validation during meta-training, and the model its final evaluation scores."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from implicit_meta.data import EpisodeSampler, FewShotDataset
from implicit_meta.distributed import all_gather_objects, broadcast_object
from implicit_meta.fewshot._run_state import Run
from implicit_meta.fewshot.builders import build_meta_optimizer, build_model
from implicit_meta.fewshot.checkpoint import load_checkpoint, save_checkpoint
from implicit_meta.fewshot.evaluation import EvaluationResult, episode_accuracies
from implicit_meta.fewshot.metrics import MetricsLog
from implicit_meta.fewshot.run_files import BEST_NAME, CHECKPOINT_NAME


def evaluate(
    run: Run, dataset: FewShotDataset, model: nn.Module, episodes: int, progress: bool
) -> EvaluationResult:
    """Each rank scores its share of the episodes of ``dataset``; the summary covers all.

    The episodes depend only on the seed and the dataset, so every model scored on a dataset
    (the meta-trained one, the best one, the untrained one) sees the same tasks.

    Args:
        run: Supplies the settings, the device, the process group and, when ``model`` is
            ``run.model``, its meta-optimizer.
        dataset: The classes to draw episodes from.
        model: The model to adapt and score.
        episodes: Episodes over all ranks.
        progress: Show a tqdm bar.

    Returns:
        The summary of every rank's episodes (the same on every rank).
    """
    config, context = run.config, run.context
    share = episodes // context.world_size + (context.rank < episodes % context.world_size)
    sampler = EpisodeSampler(
        dataset,
        config.ways,
        config.shots,
        config.queries,
        config.seed,
        run.device,
        rank=context.rank,
    )
    meta = run.meta if model is run.model else build_meta_optimizer(model, config)
    mine = episode_accuracies(meta, sampler, share, progress=progress)
    values = [value for part in all_gather_objects(mine, context) for value in part]
    return EvaluationResult.from_accuracies(values, config.ways, config.shots)


def validate(
    run: Run, log: MetricsLog | None, out: Path, validation: FewShotDataset
) -> EvaluationResult:
    """Score the current model on the validation episodes; keep it in best.pt if it is best.

    best.pt is written before the checkpoint that records the new best: a kill in between
    resumes from an older checkpoint, which validates this step again and rewrites the same
    best.pt.

    Args:
        run: The run; its ``best`` is updated.
        log: The metrics log (rank 0), or None.
        out: The run folder.
        validation: The validation classes.

    Returns:
        The validation score of the current model.
    """
    result = evaluate(run, validation, run.model, run.config.val_episodes, progress=False)
    if run.best is None or result.accuracy > float(run.best["accuracy"]):
        run.best = {"step": run.step, "accuracy": result.accuracy}
        state = run.state()
        if state is not None:
            save_checkpoint(state, out / BEST_NAME)
    if log is not None:
        log.append(
            {
                "step": run.step,
                "elapsed": round(run.elapsed, 3),
                "val_accuracy": result.accuracy,
                "val_ci95": result.ci95,
            }
        )
    return result


def selected_model(run: Run, out: Path, validated: bool) -> tuple[Path, int, nn.Module]:
    """The checkpoint the final evaluation scores: the best validated one, else the last.

    Args:
        run: The finished run.
        out: The run folder.
        validated: Whether the run validated (and so may have a best.pt).

    Returns:
        The checkpoint's path, its meta-step, and its model (on every rank).
    """
    if not validated or run.best is None:
        return out / CHECKPOINT_NAME, run.step, run.model
    if int(run.best["step"]) == run.step:  # best.pt holds the current parameters
        return out / BEST_NAME, run.step, run.model
    state: dict[str, Tensor] | None = None
    if run.context.is_main:
        state = load_checkpoint(out / BEST_NAME)["model"]
    state = broadcast_object(state, run.context)
    model = build_model(run.config, run.image_shape, run.device)
    assert state is not None  # every rank has rank 0's copy
    model.load_state_dict(state)
    return out / BEST_NAME, int(run.best["step"]), model
