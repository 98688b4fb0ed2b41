"""Classification losses in the ``loss_fn(module, batch)`` form the meta-optimizer expects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from implicit_meta.losses import OutputLoss, output_loss

__all__ = ["Batch", "accuracy", "cross_entropy", "cross_entropy_and_accuracy"]

Batch = tuple[Tensor, Tensor]
"""An ``(images, labels)`` pair of one task's support or query set."""


cross_entropy: OutputLoss = output_loss(F.cross_entropy)
"""Mean cross-entropy of ``module`` on ``(x, y)``: the inner loss of few-shot runs.

Called as ``cross_entropy(module, (images [B, ...], int64 labels [B]))``. It is an
:func:`~implicit_meta.output_loss`, so the adjoint's ``curvature="auto"`` uses its positive
semidefinite Gauss-Newton curvature.

Example:
    >>> float(cross_entropy(torch.nn.Identity(), (torch.zeros(2, 4), torch.tensor([0, 3]))))
    1.3862943649291992
"""


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows whose arg-max logit is the label, as a float32 scalar tensor (no sync).

    Args:
        logits: ``[B, N]``.
        labels: ``[B]`` int64.

    Returns:
        A 0-dim tensor on the logits' device.

    Example:
        >>> float(accuracy(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0])))
        0.5
    """
    return (logits.argmax(dim=-1) == labels).to(torch.float32).mean()


def _cross_entropy_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    return F.cross_entropy(logits, labels), {"accuracy": accuracy(logits.detach(), labels)}


cross_entropy_and_accuracy: OutputLoss = output_loss(_cross_entropy_and_accuracy)
"""Cross-entropy of ``module`` on ``(x, y)`` with the accuracy as aux output: the outer loss.

Called as ``cross_entropy_and_accuracy(module, (images [B, ...], int64 labels [B]))``; returns
the scalar loss and ``{"accuracy": 0-dim float32 tensor}``. The meta-optimizer reports the aux
output of the query batch at the adapted parameters (``result.outer_aux["accuracy"]``), from
the outer gradient's own forward pass. Stated on the model's outputs (an
:func:`~implicit_meta.output_loss`), so that with ``adapt="head"`` it is evaluated on the
body's features, computed once per batch.

Example:
    >>> loss, aux = cross_entropy_and_accuracy(
    ...     torch.nn.Identity(), (torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])))
    >>> float(aux["accuracy"])
    0.5
"""
