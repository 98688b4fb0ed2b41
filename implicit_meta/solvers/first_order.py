"""First-order inner solvers, ``"sgd"`` and ``"adam"``, on torchopt's functional optimizers.

torchopt's update rules are pure functions of a parameter dict, so the solvers below keep no
state outside the loop, never sync with the host, and run under ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import torchopt

from implicit_meta.functional._grad import grad
from implicit_meta.functional._tree import Params
from implicit_meta.solvers.registry import Objective, inner_solver


def _run_torchopt(
    optimizer: torchopt.base.GradientTransformation,
    objective: Objective,
    params: Params,
    steps: int,
) -> Params:
    grad_fn: Callable[[Params], Params] = grad(objective)
    state = optimizer.init(params)
    for _ in range(steps):
        grads = grad_fn(params)
        updates, state = optimizer.update(grads, state, params=params, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    return params


@inner_solver("sgd")
def sgd(
    objective: Objective,
    params: Params,
    *,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> Params:
    """Gradient descent, optionally with (Nesterov) momentum, for ``steps`` steps.

    Converges on a ``mu``-strongly convex, ``L``-smooth objective for ``lr < 2 / L`` (the proximal
    term adds ``reg`` to both ``mu`` and ``L``).

    Args:
        objective: Full proximal inner objective.
        params: Starting point (the meta-parameters).
        steps: Number of gradient steps.
        lr: Step size.
        momentum: Heavy-ball momentum coefficient in ``[0, 1)``.
        nesterov: Use Nesterov momentum.

    Returns:
        The parameters after ``steps`` steps.

    Example:
        >>> import torch
        >>> f = lambda p: 0.5 * ((p["w"] - 3.0) ** 2).sum()
        >>> w = sgd(f, {"w": torch.zeros(1)}, steps=50, lr=0.5)["w"]
        >>> round(float(w), 6)
        3.0
    """
    optimizer = torchopt.sgd(lr, momentum=momentum, nesterov=nesterov)
    return _run_torchopt(optimizer, objective, params, steps)


@inner_solver("adam")
def adam(
    objective: Objective,
    params: Params,
    *,
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Params:
    """Adam for ``steps`` steps (torchopt's functional Adam, bias-corrected).

    Args:
        objective: Full proximal inner objective.
        params: Starting point (the meta-parameters).
        steps: Number of Adam steps.
        lr: Step size.
        betas: Exponential decay rates of the first and second moment estimates.
        eps: Term added to the denominator for numerical stability.

    Returns:
        The parameters after ``steps`` steps.

    Example:
        >>> import torch
        >>> f = lambda p: 0.5 * ((p["w"] - 1.0) ** 2).sum()
        >>> out = adam(f, {"w": torch.zeros(1)}, steps=300, lr=0.05)
        >>> bool(abs(out["w"] - 1.0) < 1e-2)
        True
    """
    optimizer = torchopt.adam(lr, betas=betas, eps=eps)
    return _run_torchopt(optimizer, objective, params, steps)
