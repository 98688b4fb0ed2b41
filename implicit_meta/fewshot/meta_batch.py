"""One meta-step over a meta-batch of episodes: the place where tasks meet the meta-optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from implicit_meta.data import EpisodeBatch
from implicit_meta.fewshot.losses import cross_entropy, cross_entropy_and_accuracy
from implicit_meta.functional.cg import CGStatus
from implicit_meta.optimizer import ImplicitMetaOptimizer

__all__ = ["MetaBatchStats", "meta_backward_episodes", "meta_train_step"]


@dataclass(frozen=True)
class MetaBatchStats:
    """Task-averaged diagnostics of one meta-batch, as 0-dim tensors (no host sync yet).

    The relative values make "small" judgeable: a stationarity of 2.3 says nothing alone, a
    relative stationarity of 0.05 says the inner solver removed 95% of the gradient it started
    from (1 means no progress, above 1 divergence), and a relative CG residual of 0.3 says the
    linear solve is 30% off its right-hand side. The status shares count how the meta-batch's
    CG solves ended (``status_share.NONPOSITIVE_CURVATURE`` above 0: the system is indefinite,
    see the adjoint guide).

    Attributes:
        outer_loss: Query cross-entropy at the adapted parameters.
        query_accuracy: Query accuracy at the adapted parameters.
        inner_loss: Support cross-entropy at the adapted parameters.
        stationarity: Norm of the inner objective's gradient at the adapted parameters.
        cg_residual: Residual norm of the conjugate-gradient solve.
        relative_stationarity: ``stationarity / ||grad L_in(theta)||``, task mean.
        relative_cg_residual: ``cg_residual / ||grad L_out(phi)||``, task mean.
        status_share: ``[5]`` share of tasks per :class:`~implicit_meta.functional.CGStatus`,
            in the order of its values.

    Example:
        >>> values = [torch.tensor(v) for v in (0.5, 0.9, 0.1, 0.01, 1e-3, 0.02, 0.1)]
        >>> stats = MetaBatchStats(*values, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
        >>> record = dict(zip(MetaBatchStats.names(), stats.stacked().tolist()))
        >>> record["status_share.MAX_STEPS"], round(record["query_accuracy"], 6)
        (1.0, 0.9)
    """

    outer_loss: Tensor
    query_accuracy: Tensor
    inner_loss: Tensor
    stationarity: Tensor
    cg_residual: Tensor
    relative_stationarity: Tensor
    relative_cg_residual: Tensor
    status_share: Tensor

    def stacked(self) -> Tensor:
        """All values as one float32 vector, in the order of :meth:`names` (one transfer).

        Returns:
            A ``[12]`` tensor.
        """
        scalars = [
            self.outer_loss,
            self.query_accuracy,
            self.inner_loss,
            self.stationarity,
            self.cg_residual,
            self.relative_stationarity,
            self.relative_cg_residual,
        ]
        return torch.cat(
            [torch.stack(scalars).to(torch.float32), self.status_share.to(torch.float32)]
        )

    @staticmethod
    def names() -> tuple[str, ...]:
        """The ``metrics.jsonl`` keys of the values of :meth:`stacked`, in its order.

        Returns:
            The names; the shares are ``status_share.<CGStatus name>``.
        """
        return (
            "outer_loss",
            "query_accuracy",
            "inner_loss",
            "stationarity",
            "cg_residual",
            "relative_stationarity",
            "relative_cg_residual",
            *(f"status_share.{status.name}" for status in CGStatus),
        )


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
        >>> from implicit_meta.models import create_backbone
        >>> model = create_backbone("conv4-8", num_classes=2, in_channels=1, image_size=16)
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
        relative_stationarity=result.relative_stationarity.mean(),
        relative_cg_residual=result.relative_cg_residual.mean(),
        status_share=torch.stack([share for share in result.status_share().values()]),
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
        >>> from implicit_meta.models import create_backbone
        >>> model = create_backbone("conv4-8", num_classes=2, in_channels=1, image_size=16)
        >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()),
        ...                                 inner_steps=1, cg_steps=1)
        >>> x, y = torch.rand(2, 2, 1, 16, 16), torch.tensor([[0, 1]] * 2)
        >>> stats = meta_train_step(meta, EpisodeBatch(x, y, x, y, y))
    """
    meta.zero_grad()
    stats = meta_backward_episodes(meta, batch, strategy)
    meta.step()
    return stats
