"""The implicit meta-gradient of iMAML, as pure functions of parameter dicts.

For a task with inner loss ``L_in`` and outer loss ``L_out``, the adapted parameters are
``phi* = argmin_phi L_in(phi) + reg/2 ||phi - theta||^2`` and the meta-gradient is

    d L_out(phi*) / d theta = (I + H/reg)^-1 grad L_out(phi*),   H = Hessian of L_in at phi*,

which follows from the implicit function theorem applied to the stationarity condition
``grad L_in(phi) + reg (phi - theta) = 0``. Only that condition is differentiated; the solver that
produced ``phi*`` never is, so memory does not grow with inner steps. Which system is solved, and
how (a PSD Gauss-Newton curvature, damping, first-order), is the job of
:class:`~implicit_meta.functional.ImplicitAdjoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from implicit_meta.functional.adjoint import (
    AdjointSolve,
    ImplicitAdjoint,
    solve_adjoint,
    stationarity,
)
from implicit_meta.functional.cg import CGResult
from implicit_meta.functional.grad import grad, inside_transform
from implicit_meta.functional.hvp import ScalarFn
from implicit_meta.functional.tree import Params, tree_norm

InnerSolverFn = Callable[..., Params]


def proximal_objective(loss: ScalarFn, theta: Params, reg: float) -> ScalarFn:
    """The full iMAML inner objective ``loss(phi) + reg/2 * ||phi - theta||^2``.

    ``theta`` enters through the proximal term, which is what ties the adapted parameters to the
    meta-parameters (a solver that only starts at ``theta`` would give a zero implicit gradient).

    Args:
        loss: Inner task loss as a function of a parameter dict.
        theta: Meta-parameters (treated as constants).
        reg: Proximal regularisation strength ``lambda > 0``.

    Returns:
        A scalar function of a parameter dict.

    Example:
        >>> import torch
        >>> f = proximal_objective(lambda p: p["w"].sum(), {"w": torch.zeros(2)}, reg=2.0)
        >>> f({"w": torch.ones(2)})
        tensor(4.)
    """
    names = list(theta)
    flat_theta = torch.cat([theta[k].reshape(-1) for k in names])

    def objective(phi: Params) -> Tensor:
        # One concatenation, one subtraction and one dot product instead of three ops per
        # tensor: under torch.func transforms every op is wrapped, and the per-tensor loop cost
        # a third of a Conv4 inner step. (Not a norm: its second derivative at phi = theta, where
        # every solve starts, is NaN.)
        diff = torch.cat([phi[k].reshape(-1) for k in names]) - flat_theta
        distance = torch.dot(diff, diff)
        return loss(phi) + 0.5 * reg * distance

    return objective


def implicit_meta_gradient(
    inner_loss: ScalarFn,
    phi: Params,
    outer_grad: Params,
    adjoint: ImplicitAdjoint | None = None,
    *,
    reg: float | None = None,
    cg_steps: int | None = None,
    cg_tol: float | None = None,
    hvp_mode: str | None = None,
) -> CGResult:
    """Solve ``A g = outer_grad`` at ``phi``, ``A = I + (s C + delta I)/reg`` (see the adjoint).

    Without ``adjoint`` the system is the exact ``I + H/reg``, ``H`` the Hessian of
    ``inner_loss`` at ``phi``; the keywords set (or override) the adjoint's fields.

    Args:
        inner_loss: Inner task loss ``L_in`` (without the proximal term).
        phi: Adapted parameters at which the curvature is taken.
        outer_grad: ``grad L_out(phi)``, the right-hand side.
        adjoint: The system and its solver; default ``ImplicitAdjoint(curvature="hessian")``.
        reg: Proximal regularisation strength ``lambda > 0``.
        cg_steps: CG iterations (curvature-vector products); ``0`` returns ``outer_grad``.
        cg_tol: Relative residual tolerance of CG.
        hvp_mode: Hessian-vector product strategy (see :func:`make_hvp`).

    Returns:
        The :class:`CGResult`; its ``solution`` is the meta-gradient.

    Raises:
        ValueError: If a setting is invalid.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
        >>> L_in = lambda p: 0.5 * p["w"] @ A @ p["w"]
        >>> out = implicit_meta_gradient(L_in, {"w": torch.zeros(2)}, {"w": torch.ones(2)},
        ...                              reg=2.0, cg_steps=2)
        >>> out.solution["w"]  # reg * (A + reg I)^-1 @ 1
        tensor([0.5000, 0.3333])
    """
    base = adjoint if adjoint is not None else ImplicitAdjoint(curvature="hessian")
    changes = {
        name: value
        for name, value in (
            ("reg", reg),
            ("cg_steps", cg_steps),
            ("cg_tol", cg_tol),
            ("hvp", hvp_mode),
        )
        if value is not None
    }
    return solve_adjoint(base.replace(**changes), inner_loss, phi, outer_grad).cg


def check_solver_output(phi: object, theta: Params) -> None:
    """Raise a clear error unless ``phi`` is a dict shaped like ``theta``.

    Args:
        phi: What an inner solver returned.
        theta: The parameters it started from.

    Raises:
        ValueError: If keys or shapes differ.

    Example:
        >>> import torch
        >>> check_solver_output({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    """
    if not isinstance(phi, dict) or set(phi) != set(theta):
        keys = sorted(phi) if isinstance(phi, dict) else type(phi).__name__
        raise ValueError(
            "the inner solver must return a dict with the same keys as its params: "
            f"expected {sorted(theta)}, got {keys}"
        )
    for k, v in theta.items():
        got = phi[k]
        if not isinstance(got, Tensor) or got.shape != v.shape:
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(
                f"the inner solver returned {shape} for {k!r}, expected shape {tuple(v.shape)}"
            )


def solve_inner(
    inner_loss: ScalarFn,
    theta: Params,
    solver: InnerSolverFn,
    *,
    reg: float,
    steps: int,
    lr: float,
    solver_options: dict[str, object] | None = None,
    compile_objective: bool = False,
) -> Params:
    """Run ``solver`` on the proximal objective from a copy of ``theta``; return detached ``phi``.

    With ``compile_objective=True`` the objective goes through ``torch.compile`` (forward and
    backward are compiled together by AOTAutograd when the solver differentiates it). Compiling
    costs tens of seconds on the first task and is reused by later tasks of the same shapes, so
    it pays off in long runs, not in short ones. Under ``torch.func`` transforms (the vmapped
    batch path) the objective runs eagerly: dynamo does not trace ``functional_call`` there.

    Args:
        inner_loss: ``L_in`` as a function of a parameter dict.
        theta: Meta-parameters (the start, and the proximal anchor).
        solver: Inner solver ``solver(objective, params, *, steps, lr, **options) -> params``.
        reg: Proximal regularisation strength ``lambda > 0``.
        steps: Inner steps passed to the solver.
        lr: Inner learning rate passed to the solver.
        solver_options: Extra keyword arguments for the solver.
        compile_objective: Compile the proximal objective with ``torch.compile``.

    Returns:
        The adapted parameters, detached, keyed like ``theta``.

    Raises:
        ValueError: If the solver returns other keys or shapes than ``theta``'s.

    Example:
        >>> import torch
        >>> from implicit_meta.solvers import get_inner_solver
        >>> L = lambda p: 0.5 * (p["w"] ** 2).sum()
        >>> solve_inner(L, {"w": torch.ones(2)}, get_inner_solver("lbfgs"), reg=1.0, steps=20,
        ...             lr=1.0)["w"]
        tensor([0.5000, 0.5000])
    """
    objective = proximal_objective(inner_loss, theta, reg)
    if compile_objective and not inside_transform():
        # One code object for every task: later tasks reuse the compiled graph (the closure's
        # tensors are graph inputs, guarded on shape and dtype, not on identity).
        objective = torch.compile(objective)
    start = {k: v.clone() for k, v in theta.items()}
    phi = solver(objective, start, steps=steps, lr=lr, **(solver_options or {}))
    check_solver_output(phi, theta)
    return {k: phi[k].detach() for k in theta}


class TaskGradient(NamedTuple):
    """Meta-gradient and diagnostics of one task, all tensors (no host sync).

    Attributes:
        meta_grad: The implicit meta-gradient, a dict like ``theta``.
        phi: The adapted parameters returned by the inner solver.
        inner_loss: ``L_in(phi)``, without the proximal term.
        outer_loss: ``L_out(phi)``.
        stationarity: ``||grad L_in(phi) + reg (phi - theta)||``, zero at the exact inner optimum.
        cg: The CG result (residual norm, iterations, status).
        outer_aux: What ``outer_loss`` returned beside the loss at ``phi`` (with
            ``has_aux=True``), detached; ``{}`` otherwise.
        relative_stationarity: ``stationarity / ||grad L_in(theta)||``: the gradient norm of the
            inner objective ``G = L_in + reg/2 ||. - theta||^2`` at ``phi`` over its norm at the
            start ``theta`` (where the proximal term's gradient vanishes), so ``1`` means no
            progress, ``< 1`` progress and ``> 1`` a diverging solve; ``0`` when both norms are
            zero, ``inf`` when only the start's is.
        relative_cg_residual: ``||b - A x|| / ||b||`` of the solve, ``b = grad L_out(phi)``;
            ``0`` for ``b = 0`` and for the first-order adjoint.
    """

    meta_grad: Params
    phi: Params
    inner_loss: Tensor
    outer_loss: Tensor
    stationarity: Tensor
    cg: CGResult
    outer_aux: Any
    relative_stationarity: Tensor
    relative_cg_residual: Tensor


def safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` for non-negative tensors, with ``0/0 = 0`` and ``x/0 = inf``.

    The relative diagnostics (a norm over its scale) use it: nothing to reduce and nothing left
    is no progress lost, while a norm over a zero scale is unbounded. No host sync.

    Args:
        numerator: A non-negative tensor (a norm, say).
        denominator: A non-negative tensor of the same shape (its scale).

    Returns:
        The ratio, elementwise.

    Example:
        >>> import torch
        >>> safe_ratio(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([2.0, 0.0, 0.0]))
        tensor([0.5000, 0.0000,    inf])
    """
    positive = denominator > 0
    safe = torch.where(positive, denominator, torch.ones_like(denominator))
    degenerate = torch.where(
        numerator > 0, torch.full_like(numerator, float("inf")), torch.zeros_like(numerator)
    )
    return torch.where(positive, numerator / safe, degenerate)


_NO_GRAPH = (
    "the {what} does not depend on the parameters: the tensor it returned has no grad_fn "
    "(returned .detach()ed, computed under torch.no_grad(), or rebuilt from .item() or NumPy "
    "values?); return the loss as computed from the module's outputs"
)


def _check_tracked(flags: list[bool], what: str) -> None:
    # ``requires_grad`` is metadata (under torch.func.grad too): reading it costs no host sync.
    if flags and not all(flags):
        raise ValueError(_NO_GRAPH.format(what=what))


def start_gradient(inner_loss: ScalarFn, theta: Params) -> Params:
    """``grad L_in(theta)``, checking that ``L_in`` depends on the parameters at all.

    The scale of the relative stationarity (the inner objective's gradient at its start, where
    the proximal term's vanishes), and the place a loss that lost its graph is caught before
    any solve. One gradient, by :func:`~implicit_meta.functional.grad.grad`.

    Args:
        inner_loss: ``L_in`` as a function of a parameter dict.
        theta: The start of the inner solve.

    Returns:
        The gradient, a dict like ``theta``.

    Raises:
        ValueError: If the loss has no ``grad_fn`` (returned ``.detach()``-ed, say).

    Example:
        >>> import torch
        >>> start_gradient(lambda p: (p["w"] ** 2).sum(), {"w": torch.tensor([1.0, -2.0])})["w"]
        tensor([ 2., -4.])
    """

    def checked(params: Params) -> Tensor:
        value = inner_loss(params)
        # Checked between the forward and the backward pass, which would fail less clearly.
        _check_tracked([bool(value.requires_grad)], "inner loss (on the support batch)")
        return value

    return grad(checked)(theta)


def task_meta_gradient(
    inner_loss: ScalarFn,
    outer_loss: Callable[[Params], Any],
    theta: Params,
    solver: InnerSolverFn,
    adjoint: ImplicitAdjoint,
    *,
    steps: int,
    lr: float,
    solver_options: dict[str, object] | None = None,
    has_aux: bool = False,
    compile_objective: bool = False,
) -> TaskGradient:
    """Adapt ``theta`` to one task with ``solver`` and return the implicit meta-gradient.

    The solver sees detached tensors and the full proximal objective (with ``adjoint.reg``); its
    path is never differentiated. The gradient of ``L_in`` at ``phi`` comes out of the same
    forward pass the curvature products reuse, so stationarity costs no extra pass; its scale,
    ``||grad L_in(theta)||`` for :attr:`TaskGradient.relative_stationarity`, costs one gradient
    (as much as one SGD step) and is also where a loss that does not depend on the parameters
    is caught, before the solve.

    Args:
        inner_loss: ``L_in`` as a function of a parameter dict (a
            :class:`~implicit_meta.functional.ComposedLoss` for Gauss-Newton curvature).
        outer_loss: ``L_out`` as a function of a parameter dict; with ``has_aux=True`` it
            returns ``(loss, aux)``, ``aux`` a pytree of tensors (query accuracy, say) that comes
            back, evaluated at ``phi``, as :attr:`TaskGradient.outer_aux` at no extra cost.
        theta: Meta-parameters.
        solver: Inner solver ``solver(objective, params, *, steps, lr, **options) -> params``.
        adjoint: The linear system and its solver (``reg``, curvature, damping, CG).
        steps: Inner steps passed to the solver.
        lr: Inner learning rate passed to the solver.
        solver_options: Extra keyword arguments for the solver.
        has_aux: Whether ``outer_loss`` returns ``(loss, aux)``.
        compile_objective: Compile the inner objective (see :func:`solve_inner`).

    Returns:
        A :class:`TaskGradient`.

    Raises:
        ValueError: If the curvature does not fit the inner loss, or the inner or outer loss
            does not depend on the parameters (it has no ``grad_fn``: returned ``.detach()``-ed,
            say), which would make the meta-gradient silently zero.

    Example:
        >>> import torch
        >>> from implicit_meta.functional import ImplicitAdjoint
        >>> from implicit_meta.solvers import get_inner_solver
        >>> L = lambda p: 0.5 * (p["w"] ** 2).sum()
        >>> out = task_meta_gradient(L, L, {"w": torch.ones(2)}, get_inner_solver("lbfgs"),
        ...                          ImplicitAdjoint(reg=1.0, cg_steps=2), steps=20, lr=1.0)
        >>> out.phi["w"]  # argmin 0.5 w^2 + 0.5 (w - 1)^2
        tensor([0.5000, 0.5000])
    """
    theta = {k: v.detach() for k, v in theta.items()}
    # The inner objective's gradient at its start, where the proximal term's vanishes: the scale
    # that relative_stationarity compares with (one gradient, the cost of one SGD step).
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

    # The outer gradient first: its activations are freed before the inner gradient's graph is
    # built and held through CG, so the peak is the larger of the two, not their sum.
    flags: list[bool] = []

    def tracked_outer(params: Params) -> Any:
        value = outer_loss(params)
        flags.append(bool((value[0] if has_aux else value).requires_grad))
        return value

    if has_aux:
        outer_grad, (outer_value, outer_aux) = torch.func.grad_and_value(
            tracked_outer, has_aux=True
        )(phi)
    else:
        outer_grad, outer_value = torch.func.grad_and_value(tracked_outer)(phi)
        outer_aux = {}
    _check_tracked(flags, "outer loss (on the query batch)")
    outer_grad = dict(outer_grad)
    solve = solve_adjoint(adjoint, inner_loss, phi, outer_grad)
    meta_grad = {k: v.detach() for k, v in solve.cg.solution.items()}
    return task_gradient(
        meta_grad, phi, theta, solve, adjoint.reg, start_grad, outer_grad, outer_value, outer_aux
    )


def task_gradient(
    meta_grad: Params,
    phi: Params,
    theta: Params,
    solve: AdjointSolve,
    reg: float,
    start_grad: Params,
    outer_grad: Params,
    outer_value: Tensor,
    outer_aux: Any,
) -> TaskGradient:
    """Assemble a task's :class:`TaskGradient` with its stationarity and relative diagnostics.

    Args:
        meta_grad: The meta-gradient (detached).
        phi: The adapted parameters.
        theta: Their meta-values.
        solve: The adjoint solve at ``phi``.
        reg: The proximal strength.
        start_grad: ``grad L_in(theta)``, the scale of the relative stationarity.
        outer_grad: ``grad L_out(phi)``, the scale of the relative CG residual.
        outer_value: ``L_out(phi)``.
        outer_aux: What the outer loss returned beside it.

    Returns:
        The task's result.
    """
    task_stationarity = stationarity(solve.inner_grad, phi, theta, reg)
    return TaskGradient(
        meta_grad=meta_grad,
        phi=phi,
        inner_loss=solve.inner_loss,
        outer_loss=outer_value.detach(),
        stationarity=task_stationarity,
        cg=solve.cg,
        outer_aux=outer_aux,
        relative_stationarity=safe_ratio(task_stationarity, tree_norm(start_grad).detach()),
        relative_cg_residual=safe_ratio(
            solve.cg.residual_norm.detach(), tree_norm(outer_grad).detach()
        ),
    )
