"""The meta-gradient of partial adaptation: adapt some parameters, meta-learn the rest exactly.

The trainable parameters split into adapted ones, whose values are the proximal centres
``theta``, and shared ones ``w`` that are meta-learned but never adapted. Per task

    phi*(theta, w) = argmin_phi L_in(phi, w) + reg/2 ||phi - theta||^2,

and the implicit function theorem on the stationarity condition
``grad_phi L_in(phi*, w) + reg (phi* - theta) = 0`` gives, with ``g = grad_phi L_out(phi*, w)``
and ``v = (C + reg I)^-1 g`` (``C`` the curvature of ``L_in`` in ``phi`` at ``phi*``):

    d L_out / d theta = reg v = (I + C/reg)^-1 g,
    d L_out / d w     = grad_w L_out(phi*, w) - grad_w <grad_phi L_in(phi*, w), v>,

the second term with ``phi*`` and ``v`` held constant: the exact mixed second derivative, one
extra vector-Jacobian product. The first-order meta-gradient keeps ``g`` and the direct term
``grad_w L_out`` only.

The losses reach ``w`` through *contexts*: ``contexts(w) -> (support_context,
query_context)``, pytrees of tensors that the losses read. For a head on a shared body the
contexts are the body's features of the support and the query images, so the body runs once
per batch and every inner step, curvature product and mixed derivative touches the head alone;
the gradient in ``w`` is one vector-Jacobian product back through the body. For a general split
the contexts are ``w`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from implicit_meta.functional._attention import math_attention
from implicit_meta.functional.adjoint import ImplicitAdjoint, solve_adjoint
from implicit_meta.functional.hvp import ScalarFn
from implicit_meta.functional.implicit import (
    InnerSolverFn,
    TaskGradient,
    _check_tracked,
    solve_inner,
    start_gradient,
    task_gradient,
)
from implicit_meta.functional.tree import Params, tree_dot, tree_scale

Contexts = Callable[[Params], tuple[Any, Any]]
"""``contexts(w) -> (support_context, query_context)``: what the losses read of ``w``."""

LossAt = Callable[[Any], Callable[[Params], Any]]
"""``loss_at(context) -> (phi -> loss)``: a loss of the adapted parameters, given a context."""


def _detached(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach(), tree)


def _scaled(tree: Any, factor: float) -> Any:
    return pytree.tree_map(lambda t: t * factor, tree)


def _mixed_term(inner_at: LossAt, phi: Params, v: Params, context: Any) -> Any:
    """``grad_context <grad_phi L_in(phi, context), v>``, ``phi`` and ``v`` held constant."""

    def coupling(at: Any) -> torch.Tensor:
        return tree_dot(torch.func.grad(inner_at(at))(phi), v)

    with math_attention():  # a second derivative: see implicit_meta.functional._attention
        return torch.func.grad(coupling)(context)


def partial_task_meta_gradient(
    inner_at: LossAt,
    outer_at: LossAt,
    contexts: Contexts,
    theta: Params,
    shared: Params,
    solver: InnerSolverFn,
    adjoint: ImplicitAdjoint,
    *,
    steps: int,
    lr: float,
    solver_options: dict[str, object] | None = None,
    has_aux: bool = False,
    compile_objective: bool = False,
) -> TaskGradient:
    """Adapt ``theta`` with ``w = shared`` fixed; return the meta-gradient in both.

    Only the adapted parameters are solved for; ``contexts`` is evaluated once, at ``shared``,
    and its graph is kept for the one vector-Jacobian product that brings the context
    gradients back to ``shared``. Nothing differentiates through the solver.

    Args:
        inner_at: ``inner_at(support_context)`` is ``L_in`` as a function of the adapted
            parameters (a :class:`~implicit_meta.functional.ComposedLoss` for Gauss-Newton
            curvature).
        outer_at: ``outer_at(query_context)`` is ``L_out`` as a function of the adapted
            parameters; with ``has_aux=True`` it returns ``(loss, aux)``.
        contexts: ``contexts(shared) -> (support_context, query_context)``, pytrees of tensors.
        theta: The adapted parameters' meta-values (the proximal centres).
        shared: The shared meta-parameters ``w``.
        solver: Inner solver ``solver(objective, params, *, steps, lr, **options) -> params``.
        adjoint: The linear system and its solver; ``adjoint.reg`` is the proximal strength.
        steps: Inner steps passed to the solver.
        lr: Inner learning rate passed to the solver.
        solver_options: Extra keyword arguments for the solver.
        has_aux: Whether ``outer_at(...)`` returns ``(loss, aux)``.
        compile_objective: Compile the inner objective (see
            :func:`~implicit_meta.functional.solve_inner`).

    Returns:
        A :class:`~implicit_meta.functional.TaskGradient` whose ``meta_grad`` holds the keys of
        ``theta`` and of ``shared``, and whose ``phi`` holds the adapted parameters.

    Raises:
        ValueError: If a loss does not depend on the parameters, or the curvature does not fit
            the inner loss.

    Example:
        >>> import torch
        >>> from implicit_meta.functional import ImplicitAdjoint
        >>> from implicit_meta.solvers import get_inner_solver
        >>> # L_in = L_out = 0.5 (phi - w)^2: phi* = (w + reg theta) / (1 + reg).
        >>> loss_at = lambda c: (lambda p: 0.5 * ((p["phi"] - c["w"]) ** 2).sum())
        >>> out = partial_task_meta_gradient(
        ...     loss_at, loss_at, lambda w: (w, w), {"phi": torch.tensor([1.0])},
        ...     {"w": torch.tensor([3.0])}, get_inner_solver("lbfgs"),
        ...     ImplicitAdjoint(reg=1.0, cg_steps=2), steps=20, lr=1.0)
        >>> out.phi["phi"], out.meta_grad["phi"], out.meta_grad["w"]
        (tensor([2.]), tensor([-0.5000]), tensor([0.5000]))
    """
    theta = {k: v.detach() for k, v in theta.items()}
    shared = {k: v.detach() for k, v in shared.items()}
    # One evaluation of the contexts (the body on the support and the query), graph kept.
    if shared:
        evaluated: Any = torch.func.vjp(contexts, shared)
        (support_context, query_context), contexts_vjp = evaluated
    else:  # every trainable parameter adapts: nothing to bring back
        support_context, query_context = contexts(shared)
        contexts_vjp = None
    support_context = _detached(support_context)
    query_context = _detached(query_context)
    inner_loss: ScalarFn = inner_at(support_context)
    start_grad = start_gradient(inner_loss, theta)
    phi = solve_inner(
        inner_loss,
        theta,
        solver,
        reg=adjoint.reg,
        steps=steps,
        lr=lr,
        solver_options=solver_options,
        compile_objective=compile_objective,
    )

    flags: list[bool] = []

    def outer_of(params: Params, context: Any) -> Any:
        value = outer_at(context)(params)
        flags.append(bool((value[0] if has_aux else value).requires_grad))
        return value

    grads: Any
    if has_aux:
        grads, (outer_value, outer_aux) = torch.func.grad_and_value(
            outer_of, argnums=(0, 1), has_aux=True
        )(phi, query_context)
    else:
        grads, outer_value = torch.func.grad_and_value(outer_of, argnums=(0, 1))(phi, query_context)
        outer_aux = {}
    outer_grad, query_cotangent = grads
    _check_tracked(flags, "outer loss (on the query batch)")
    outer_grad = dict(outer_grad)
    solve = solve_adjoint(adjoint, inner_loss, phi, outer_grad)
    meta_theta = {k: v.detach() for k, v in solve.cg.solution.items()}

    meta_shared: Params = {}
    if contexts_vjp is not None:
        if adjoint.first_order:
            support_cotangent = pytree.tree_map(torch.zeros_like, support_context)
        else:
            v = tree_scale(1.0 / adjoint.reg, meta_theta)  # v = (C + reg I)^-1 g
            support_cotangent = _scaled(_mixed_term(inner_at, phi, v, support_context), -1.0)
        (meta_shared,) = contexts_vjp((support_cotangent, query_cotangent))
    meta_grad = {**meta_theta, **{k: v.detach() for k, v in meta_shared.items()}}
    return task_gradient(
        meta_grad, phi, theta, solve, adjoint.reg, start_grad, outer_grad, outer_value, outer_aux
    )
