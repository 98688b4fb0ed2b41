"""Dense Newton inner solver, for small strictly convex problems such as a classifier head.

Every step forms the full Hessian of the proximal objective (``torch.func.jacrev`` twice, one
vectorised pass rather than one product per direction), solves the Newton system exactly with
``torch.linalg.solve`` and picks the step length by an Armijo backtracking search. All candidate
lengths are evaluated and the first acceptable one is chosen with ``torch.where``, so there is
no host sync and the solver runs under vmap. Memory and time grow with the square and the cube
of the number of parameters: meant for heads of a few thousand parameters, not whole networks
(use ``"newton_cg"`` there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from implicit_meta.functional._attention import math_attention
from implicit_meta.functional.tree import Params
from implicit_meta.solvers._line_search import armijo_step
from implicit_meta.solvers.registry import Objective, register_inner_solver


@register_inner_solver("newton")
def newton(
    objective: Objective,
    params: Params,
    *,
    steps: int,
    lr: float,
    line_search_steps: int = 4,
    armijo: float = 1e-4,
    shrink: float = 0.5,
) -> Params:
    """Dense Newton steps with an Armijo backtracking line search.

    On a strictly convex objective (the proximal term makes a convex head strictly convex) the
    full step ``lr = 1`` is accepted near the optimum and convergence is quadratic. Where the
    Newton direction is not a descent direction (an indefinite Hessian), ``-g`` is used.

    Args:
        objective: Full proximal inner objective.
        params: Starting point (the meta-parameters).
        steps: Number of Newton steps.
        lr: First step length tried by the line search; ``1.0`` is the full Newton step.
        line_search_steps: Number of step lengths tried, ``lr * shrink**i``.
        armijo: Sufficient-decrease constant of the Armijo condition.
        shrink: Factor between successive step lengths, in ``(0, 1)``.

    Returns:
        The parameters after ``steps`` Newton steps.

    Raises:
        ValueError: If ``shrink`` is not in ``(0, 1)`` or ``line_search_steps < 1``.

    Example:
        >>> import torch
        >>> f = lambda p: ((p["w"] - 2.0) ** 4).sum() + 0.5 * (p["w"] ** 2).sum()
        >>> w = newton(f, {"w": torch.zeros(2, dtype=torch.float64)}, steps=20, lr=1.0)["w"]
        >>> float(torch.func.grad(f)({"w": w})["w"].abs().max()) < 1e-10
        True
    """
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"newton shrink must be in (0, 1), got {shrink}")
    if line_search_steps < 1:
        raise ValueError(f"newton line_search_steps must be at least 1, got {line_search_steps}")
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def unflatten(flat: Tensor) -> Params:
        parts = torch.split(flat, sizes)
        return {k: part.reshape(shape) for k, part, shape in zip(names, parts, shapes, strict=True)}

    def flat_objective(flat: Tensor) -> Tensor:
        return objective(unflatten(flat))

    def gradient_with_value(flat: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        gradient, value = torch.func.grad_and_value(flat_objective)(flat)
        return gradient, (gradient, value)

    # Reverse over reverse, with the gradient and value of the same pass as aux: on a small
    # head it was several times faster on the CPU than torch.func.hessian (forward over
    # reverse) beside a separate gradient.
    hessian_gradient_value = torch.func.jacrev(gradient_with_value, has_aux=True)
    point = torch.cat([params[k].reshape(-1) for k in names])
    for _ in range(steps):
        with math_attention():  # a second derivative: see implicit_meta.functional._attention
            hessian, (gradient, value) = hessian_gradient_value(point)
        gradient, value = gradient.detach(), value.detach()
        direction = -torch.linalg.solve(hessian, gradient)
        slope = torch.dot(gradient, direction)
        descent = slope < 0
        direction = torch.where(descent, direction, -gradient)
        slope = torch.where(descent, slope, -torch.dot(gradient, gradient))

        # Near the optimum the decrease falls below the objective's rounding (float32 above
        # all): a few ulps of slack keep Newton's quadratic steps from stalling there.
        def trial(step: float, x: Tensor = point, d: Tensor = direction) -> Tensor:
            return flat_objective(x + step * d)

        chosen = armijo_step(
            trial,
            value,
            slope,
            lr=lr,
            steps=line_search_steps,
            armijo=armijo,
            shrink=shrink,
            slack=8 * torch.finfo(value.dtype).eps * value.abs(),
        )
        point = (point + chosen * direction).detach()
    return unflatten(point)
