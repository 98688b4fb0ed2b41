"""``output_loss``: a loss stated on the model's outputs, so that Gauss-Newton curvature applies.

A plain ``loss_fn(module, batch)`` hides the model's outputs inside it. The generalized
Gauss-Newton curvature ``J^T H_l J`` needs them apart from the loss, so it asks for the loss in
the form ``criterion(outputs, targets)`` on batches ``(inputs, targets)``. An
:class:`OutputLoss` is still a ``loss_fn(module, batch)``, so it works everywhere a plain one
does (inner and outer loss, :meth:`~implicit_meta.ImplicitMetaOptimizer.adapt`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["OutputLoss", "output_loss", "split_batch"]

Criterion = Callable[[Tensor, Any], Any]
"""``criterion(outputs, targets) -> scalar tensor``, e.g. ``torch.nn.functional.cross_entropy``.

An outer loss may also return ``(scalar tensor, aux)``, as any ``loss_fn`` may.
"""


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch, with a clear error for any other shape.

    Args:
        batch: A pair (tuple or list) ``(inputs, targets)``.

    Returns:
        The two parts.

    Raises:
        TypeError: If ``batch`` is not a pair.

    Example:
        >>> split_batch((1, 2))
        (1, 2)
    """
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        what = (
            f"{type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, tuple | list)
            else type(batch).__name__
        )
        raise TypeError(
            f"an output_loss takes batches (inputs, targets), got a {what}; write a plain "
            "loss_fn(module, batch) for other batch layouts (with curvature='hessian')"
        )
    return batch[0], batch[1]


@dataclass(frozen=True)
class OutputLoss:
    """``loss_fn(module, (inputs, targets)) = criterion(module(inputs), targets)``.

    Build it with :func:`output_loss`. The meta-optimizer recognises it and, with the default
    ``curvature="auto"``, uses the positive semidefinite Gauss-Newton curvature of
    ``criterion`` (convex in the outputs for cross-entropy and squared error).

    Attributes:
        criterion: ``criterion(outputs, targets) -> scalar tensor``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> loss = OutputLoss(F.mse_loss)
        >>> loss(torch.nn.Identity(), (torch.zeros(3), torch.ones(3)))
        tensor(1.)
    """

    criterion: Criterion

    def __call__(self, module: nn.Module, batch: Any) -> Any:
        """The loss of ``module`` on ``batch = (inputs, targets)``."""
        inputs, targets = split_batch(batch)
        return self.criterion(module(inputs), targets)


def output_loss(criterion: Criterion) -> OutputLoss:
    """State a loss on the model's outputs; also usable as a decorator.

    Args:
        criterion: ``criterion(outputs, targets) -> scalar tensor``; it should be convex in the
            outputs (cross-entropy, squared error) for the Gauss-Newton curvature to be positive
            semidefinite.

    Returns:
        An :class:`OutputLoss`, callable as ``loss_fn(module, (inputs, targets))``.

    Raises:
        TypeError: If ``criterion`` is not callable.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import implicit_meta as im
        >>> ce = im.output_loss(F.cross_entropy)
        >>> @im.output_loss
        ... def half_mse(outputs, targets):
        ...     return 0.5 * F.mse_loss(outputs, targets)
        >>> float(half_mse(torch.nn.Identity(), (torch.zeros(2), torch.ones(2))))
        0.5
    """
    if not callable(criterion):
        raise TypeError(f"output_loss needs a callable criterion, got {type(criterion).__name__}")
    return OutputLoss(criterion)
