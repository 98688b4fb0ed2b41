"""One meta-step over a meta-batch of episodes: the place where tasks meet the meta-optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_meta.data import EpisodeBatch
from implicit_meta.fewshot.tasks import cross_entropy, cross_entropy_and_accuracy
from implicit_meta.optimizer import ImplicitMetaOptimizer

__all__ = ["MetaBatchStats", "meta_backward_episodes", "meta_train_step"]


@dataclass(frozen=True)
class MetaBatchStats:
    """Task-averaged diagnostics of one meta-batch, as 0-dim tensors (no host sync yet).

    Attributes:
        outer_loss: Query cross-entropy at the adapted parameters.
        query_accuracy: Query accuracy at the adapted parameters.
        inner_loss: Support cross-entropy at the adapted parameters.
        stationarity: Norm of the inner objective's gradient at the adapted parameters.
        cg_residual: Residual norm of the conjugate-gradient solve.

    Example:
        >>> stats = MetaBatchStats(*(torch.tensor(v) for v in (0.5, 0.9, 0.1, 0.01, 1e-3)))
        >>> dict(zip(MetaBatchStats.names(), stats.stacked().tolist()))["query_accuracy"]
        0.8999999761581421
    """

    outer_loss: Tensor
    query_accuracy: Tensor
    inner_loss: Tensor
    stationarity: Tensor
    cg_residual: Tensor

    def stacked(self) -> Tensor:
        """All fields as one float32 vector, in field order (one transfer reads them all).

        Returns:
            A ``[5]`` tensor.
        """
        return torch.stack(
            [
                self.outer_loss,
                self.query_accuracy,
                self.inner_loss,
                self.stationarity,
                self.cg_residual,
            ]
        ).to(torch.float32)

    @staticmethod
    def names() -> tuple[str, ...]:
        """Field names in the order of :meth:`stacked`.

        Returns:
            The names.
        """
        return ("outer_loss", "query_accuracy", "inner_loss", "stationarity", "cg_residual")


def meta_backward_episodes(
    meta: ImplicitMetaOptimizer, batch: EpisodeBatch, strategy: str = "auto"
) -> MetaBatchStats:
    """Accumulate the task-mean implicit meta-gradient of a meta-batch into ``p.grad``.

    The inner and outer losses are the cross-entropy; the query accuracy at the adapted
    parameters comes from the outer gradient's forward pass as aux output (see
    :func:`~implicit_meta.fewshot.cross_entropy_and_accuracy`), so it costs no extra pass. The
    tasks go through one :meth:`ImplicitMetaOptimizer.meta_backward_batch` call with
    ``reduction="mean"``.

    Args:
        meta: The meta-optimizer of the model.
        batch: ``T`` episodes (``xs``, ``ys``, ``xq``, ``yq`` with a leading task dimension) on
            the model's device.
        strategy: ``"auto"``, ``"vmap"`` or ``"loop"`` (see ``meta_backward_batch``).

    Returns:
        Task-averaged losses, accuracy and solver diagnostics.

    Example:
        >>> import implicit_meta as im
        >>> from implicit_meta.models import build_backbone
        >>> model = build_backbone("conv4-8", num_classes=2, in_channels=1, image_size=16)
        >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()),
        ...                                 inner_steps=1, cg_steps=1)
        >>> x, y = torch.rand(3, 2, 1, 16, 16), torch.tensor([[0, 1]] * 3)
        >>> stats = meta_backward_episodes(meta, EpisodeBatch(x, y, x, y, y))
        >>> 0.0 <= float(stats.query_accuracy) <= 1.0
        True
    """
    result = meta.meta_backward_batch(
        cross_entropy,
        (batch.xs, batch.ys),
        (batch.xq, batch.yq),
        reduction="mean",
        outer_loss_fn=cross_entropy_and_accuracy,
        strategy=strategy,
    )
    return MetaBatchStats(
        outer_loss=result.outer_loss.mean(),
        query_accuracy=result.outer_aux["accuracy"].mean(),
        inner_loss=result.inner_loss.mean(),
        stationarity=result.stationarity.mean(),
        cg_residual=result.cg_residual.mean(),
    )


def meta_train_step(
    meta: ImplicitMetaOptimizer, batch: EpisodeBatch, strategy: str = "auto"
) -> MetaBatchStats:
    """One meta-step: clear gradients, accumulate the meta-batch's meta-gradient, step.

    Args:
        meta: The meta-optimizer of the model.
        batch: The meta-batch, on the model's device.
        strategy: ``"auto"``, ``"vmap"`` or ``"loop"`` (see ``meta_backward_batch``).

    Returns:
        The meta-batch diagnostics (see :func:`meta_backward_episodes`).

    Example:
        >>> import implicit_meta as im
        >>> from implicit_meta.models import build_backbone
        >>> model = build_backbone("conv4-8", num_classes=2, in_channels=1, image_size=16)
        >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()),
        ...                                 inner_steps=1, cg_steps=1)
        >>> x, y = torch.rand(2, 2, 1, 16, 16), torch.tensor([[0, 1]] * 2)
        >>> stats = meta_train_step(meta, EpisodeBatch(x, y, x, y, y))
    """
    meta.zero_grad()
    stats = meta_backward_episodes(meta, batch, strategy)
    meta.step()
    return stats
