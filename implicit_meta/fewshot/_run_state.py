"""What a training run resumes from: its live objects, their checkpoint, and its metrics records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from implicit_meta import __version__
from implicit_meta.data import EpisodeSampler
from implicit_meta.distributed import DistributedContext, all_gather_objects
from implicit_meta.fewshot.checkpoint import (
    CHECKPOINT_FORMAT,
    decode_json_tensor,
    encode_json_tensor,
    save_checkpoint,
)
from implicit_meta.fewshot.config import TrainConfig, meta_lr_at
from implicit_meta.fewshot.meta_batch import MetaBatchStats
from implicit_meta.optimizer import ImplicitMetaOptimizer


@dataclass
class Run:
    """The live objects of a run, kept together for checkpointing.

    Attributes:
        config: The run settings.
        model: The meta-trained model (the meta-parameters).
        meta: Its meta-optimizer (inner solver, adjoint and Adam).
        scheduler: The meta learning-rate schedule of ``meta.outer_optimizer``.
        sampler: This rank's stream of meta-train episodes.
        image_shape: ``(channels, height, width)`` of the dataset's images.
        device: Where the model and the episodes live.
        context: This process's place in the process group.
        step: Meta-steps completed.
        elapsed: Seconds of meta-training so far, for the logs only.
        best: The best validation score so far and its step, or None.
    """

    config: TrainConfig
    model: nn.Module
    meta: ImplicitMetaOptimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: EpisodeSampler
    image_shape: tuple[int, int, int]
    device: torch.device
    context: DistributedContext
    step: int = 0
    elapsed: float = 0.0
    # The best validation score so far and its step; in the checkpoint, so that a resumed run
    # keeps the same best.pt as an uninterrupted one.
    best: dict[str, float | int] | None = None

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

    def state(self) -> dict[str, Any] | None:
        """The checkpoint, on rank 0 (None elsewhere); every rank must call it (it gathers).

        The model and Adam's state are the same on every rank; the random streams are not, so
        ``ranks`` holds each rank's (the top-level ``sampler``/``torch_rng``/``cuda_rng`` are
        rank 0's, the layout of a single-process checkpoint). Nothing in it depends on the
        clock, so the same run gives the same bytes.
        """
        mine = self._rank_state()
        ranks = all_gather_objects(mine, self.context)
        if not self.context.is_main:
            return None
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "image_shape": list(self.image_shape),
            "step": self.step,
            "model": self.model.state_dict(),
            "meta": self.meta.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "best": dict(self.best) if self.best is not None else {},
            **mine,
            "world_size": self.context.world_size,
            "ranks": ranks,
            "versions": {"implicit_meta": __version__, "torch": str(torch.__version__)},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from the checkpoint ``state``: parameters, optimiser, schedule and streams.

        Args:
            state: A checkpoint written by :meth:`state`, or by an older version.

        Raises:
            ValueError: If the checkpoint was trained on images of another shape.
        """
        if tuple(state.get("image_shape", ())) != self.image_shape:
            raise ValueError(
                f"the checkpoint was trained on images of shape {state.get('image_shape')}, "
                f"the dataset has {list(self.image_shape)}"
            )
        self.model.load_state_dict(state["model"])
        self.meta.load_state_dict(state["meta"])
        self.step = int(state["step"])
        if "lr_scheduler" in state:
            self.scheduler.load_state_dict(state["lr_scheduler"])
        else:
            # A checkpoint of an older version (its rate followed the clock): continue the
            # step-indexed schedule from its step.
            self.scheduler.last_epoch = self.step
            for group in self.meta.outer_optimizer.param_groups:
                group["lr"] = meta_lr_at(self.config, self.step)
        self.best = dict(state["best"]) if state.get("best") else None
        streams = state["ranks"][self.context.rank] if "ranks" in state else state
        self.sampler.load_state_dict(decode_json_tensor(streams["sampler"]))
        torch.set_rng_state(streams["torch_rng"].cpu())
        if self.device.type == "cuda" and streams.get("cuda_rng"):
            torch.cuda.set_rng_state_all([s.cpu() for s in streams["cuda_rng"]])

    def checkpoint(self, path: Path) -> None:
        """Write the checkpoint (rank 0); every rank must call it."""
        state = self.state()
        if state is not None:
            save_checkpoint(state, path)

    @property
    def lr(self) -> float:
        """The meta learning rate of the next meta-step."""
        return float(self.meta.outer_optimizer.param_groups[0]["lr"])


def metrics_record(
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
