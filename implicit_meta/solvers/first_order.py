"""First-order inner solvers, ``"sgd"`` and ``"adam"``, on torchopt's functional optimizers.

torchopt's update rules are pure functions of a parameter dict, so the solvers below keep no
state outside the loop, never sync with the host, and run under ``torch.func.vmap``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torchopt

from implicit_meta.functional.grad import grad
from implicit_meta.functional.tree import Params
from implicit_meta.solvers.registry import Objective, register_inner_solver


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


@register_inner_solver("sgd")
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

    Raises:
        ValueError: If ``momentum`` is outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> f = lambda p: 0.5 * ((p["w"] - 3.0) ** 2).sum()
        >>> w = sgd(f, {"w": torch.zeros(1)}, steps=50, lr=0.5)["w"]
        >>> round(float(w), 6)
        3.0
    """
    if isinstance(momentum, numbers.Real):
        check_momentum(momentum)
    optimizer = torchopt.sgd(lr, momentum=momentum, nesterov=nesterov)
    return _run_torchopt(optimizer, objective, params, steps)


def check_momentum(momentum: object) -> float:
    """``momentum`` as a float in ``[0, 1)``, or an error that says it is invalid.

    Heavy-ball momentum ``mu >= 1`` never contracts (the iterates' error is multiplied by at
    least ``mu`` every step, whatever the step size), and a negative one is not momentum.

    Args:
        momentum: The momentum coefficient.

    Returns:
        It, as a float.

    Raises:
        TypeError: If it is not a real number.
        ValueError: If it is outside ``[0, 1)``.

    Example:
        >>> check_momentum(0.9)
        0.9
    """
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number, got {momentum!r}")
    value = float(momentum)
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"invalid momentum {value:g}: SGD momentum must be in [0, 1) (0.9 is common); "
            "at 1 or above the inner iterates never converge"
        )
    return value


def proximal_step_limit(momentum: float = 0.0, nesterov: bool = False) -> float:
    """The largest ``lr * reg`` at which (momentum) SGD still contracts the proximal term.

    The proximal term ``reg/2 ||phi - theta||^2`` alone has curvature ``reg`` in every
    direction, and a network's loss is nearly flat in most of them, so SGD on the inner problem
    diverges once ``lr * reg`` reaches the stability limit of a quadratic of curvature ``reg``:
    ``2`` for plain gradient descent, ``2 (1 + mu)`` for heavy-ball momentum ``mu`` and
    ``2 (1 + mu) / (1 + 2 mu)`` for Nesterov's.

    Args:
        momentum: Momentum coefficient ``mu`` in ``[0, 1)``.
        nesterov: Nesterov momentum.

    Returns:
        The limit; ``lr * reg`` must stay below it.

    Example:
        >>> proximal_step_limit(), proximal_step_limit(0.5), proximal_step_limit(0.5, True)
        (2.0, 3.0, 1.5)
    """
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 2.0 * (1.0 + momentum)


@register_inner_solver("adam")
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
