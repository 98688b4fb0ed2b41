"""The sync-free Armijo backtracking search the Newton solvers share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def armijo_step(
    value_at: Callable[[float], Tensor],
    value: Tensor,
    slope: Tensor,
    *,
    lr: float,
    steps: int,
    armijo: float,
    shrink: float,
    slack: Tensor | None = None,
) -> Tensor:
    """The first of ``lr * shrink**i`` that passes the Armijo test, or 0 if none does.

    Every candidate is evaluated and the first acceptable one is selected with ``torch.where``,
    which costs a few extra evaluations but needs no host sync, so solvers using it run under
    vmap.

    Args:
        value_at: The objective at a step length along the search direction.
        value: The objective at the current point.
        slope: Its directional derivative along the direction (negative for descent).
        lr: The first step length tried.
        steps: Number of step lengths tried.
        armijo: Sufficient-decrease constant.
        shrink: Factor between successive step lengths.
        slack: Tolerance added to the test's right-hand side, if any.

    Returns:
        The chosen step length, a tensor shaped like ``value``.

    Example:
        >>> f = lambda t: torch.tensor((1.0 - t) ** 2)
        >>> armijo_step(f, f(0.0), torch.tensor(-2.0), lr=1.0, steps=3, armijo=1e-4, shrink=0.5)
        tensor(1.)
    """
    chosen = torch.zeros_like(value)
    found = torch.zeros((), dtype=torch.bool, device=value.device)
    step = lr
    for _ in range(steps):
        bound = value + armijo * step * slope
        if slack is not None:
            bound = bound + slack
        accept = ~found & (value_at(step) <= bound)
        chosen = torch.where(accept, torch.full_like(chosen, step), chosen)
        found = found | accept
        step *= shrink
    return chosen
