"""Classification losses in the ``loss_fn(module, batch)`` form the meta-optimizer expects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Batch", "QueryRecorder", "accuracy", "cross_entropy"]

Batch = tuple[Tensor, Tensor]
"""An ``(images, labels)`` pair of one task's support or query set."""


def cross_entropy(module: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of ``module`` on ``(x, y)``: the inner and outer loss of few-shot runs.

    Args:
        module: Classifier returning logits ``[B, N]``.
        batch: Images ``[B, ...]`` and int64 labels ``[B]``.

    Returns:
        A scalar tensor.

    Example:
        >>> float(cross_entropy(torch.nn.Identity(), (torch.zeros(2, 4), torch.tensor([0, 3]))))
        1.3862943649291992
    """
    x, y = batch
    return F.cross_entropy(module(x), y)


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


class QueryRecorder:
    """An outer loss that also records the query loss and accuracy of each call.

    ``meta_backward`` evaluates the outer loss once, at the adapted parameters, so the last
    recorded value of a call is the task's query accuracy at ``phi*``, obtained without an extra
    forward pass. The loss it returns is ``scale`` times the cross-entropy: a meta-batch of
    ``T`` tasks passes ``scale = 1/T`` so the accumulated meta-gradient is the task mean (the
    implicit gradient is linear in the outer loss). The recorded loss is unscaled.

    Recorded values are detached tensors, so recording never forces a host sync.

    Args:
        scale: Factor applied to the returned loss.

    Example:
        >>> rec = QueryRecorder(scale=0.5)
        >>> loss = rec(torch.nn.Identity(), (torch.tensor([[1.0, 0.0]]), torch.tensor([0])))
        >>> float(rec.accuracies[-1]), bool(torch.isclose(loss, 0.5 * rec.losses[-1]))
        (1.0, True)
    """

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.losses: list[Tensor] = []
        self.accuracies: list[Tensor] = []

    def __call__(self, module: nn.Module, batch: Batch) -> Tensor:
        """Return ``scale`` times the cross-entropy and record the loss and the accuracy.

        Args:
            module: The classifier at the parameters being evaluated.
            batch: The query ``(x, y)``.

        Returns:
            The scaled loss.
        """
        x, y = batch
        logits = module(x)
        loss = F.cross_entropy(logits, y)
        self.losses.append(loss.detach())
        self.accuracies.append(accuracy(logits.detach(), y))
        return loss * self.scale
