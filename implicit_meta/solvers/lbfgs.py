"""The ``"lbfgs"`` inner solver: ``torch.optim.LBFGS`` with a strong-Wolfe line search.

It runs through the torch.optim adapter (:func:`torch_optimizer_solver`), with ``inner_steps``
as LBFGS's iteration limit rather than a number of ``step`` calls. The line search branches on
values on the host, so the solver is registered as not vmappable.
"""

from __future__ import annotations

from typing import Any

import torch

from implicit_meta.functional.tree import Params
from implicit_meta.solvers.registry import Objective, register_inner_solver
from implicit_meta.solvers.torch_optim import torch_optimizer_solver


@register_inner_solver(
    "lbfgs",
    vmappable=False,
    reason="lbfgs runs torch.optim.LBFGS, whose line search branches on values on the host",
)
def lbfgs(
    objective: Objective,
    params: Params,
    *,
    steps: int,
    lr: float,
    history_size: int = 100,
    line_search_fn: str | None = "strong_wolfe",
    tolerance_grad: float | None = None,
    tolerance_change: float | None = None,
) -> Params:
    """L-BFGS with a strong-Wolfe line search (``torch.optim.LBFGS``), ``steps`` iterations.

    Args:
        objective: Full proximal inner objective.
        params: Starting point (the meta-parameters).
        steps: Maximum number of L-BFGS iterations (``max_iter``).
        lr: Initial step length of each line search; ``1.0`` suits L-BFGS.
        history_size: Number of curvature pairs kept.
        line_search_fn: ``"strong_wolfe"`` or ``None`` (fixed step ``lr``).
        tolerance_grad: Stop when the largest gradient entry is below this; default
            ``10 * eps`` of the dtype (torch's own 1e-7 stops too early in float64).
        tolerance_change: Stop when the loss or the step changes less than this; default ``0``
            (a loss change below ``eps`` comes long before the gradient is small).

    Returns:
        The parameters after at most ``steps`` iterations.

    Example:
        >>> import torch
        >>> f = lambda p: 0.5 * ((p["w"] - 3.0) ** 2).sum()
        >>> lbfgs(f, {"w": torch.zeros(2, dtype=torch.float64)}, steps=10, lr=1.0)["w"]
        tensor([3., 3.], dtype=torch.float64)
    """
    if steps == 0:
        return dict(params)
    options: dict[str, Any] = {
        "max_iter": steps,
        "history_size": history_size,
        "line_search_fn": line_search_fn,
    }
    if tolerance_grad is not None:
        options["tolerance_grad"] = tolerance_grad
    if tolerance_change is not None:
        options["tolerance_change"] = tolerance_change
    solve = torch_optimizer_solver(torch.optim.LBFGS)
    return solve(objective, params, steps=1, lr=lr, **options)
