"""Run any ``torch.optim.Optimizer`` subclass as an inner solver, and check its options.

torch.optim optimizers mutate leaf tensors, so the adapter gives them detached copies that
require grad and drives them with a closure (which LBFGS needs and every optimizer accepts). They
branch on tensor values on the host, so these solvers are declared not vmappable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit_meta.functional.tree import Params
from implicit_meta.solvers.registry import Objective, declare_solver, solver_options


def _tight_lbfgs_tolerances(params: Params, options: dict[str, Any]) -> dict[str, Any]:
    # torch.optim.LBFGS's defaults (tolerance_grad=1e-7, tolerance_change=1e-9) stop far from
    # the optimum of a float64 problem; iMAML's implicit gradient assumes the inner problem is
    # solved, so stop only near machine precision unless the user said otherwise.
    eps = max(torch.finfo(v.dtype).eps for v in params.values())
    merged = dict(options)
    merged.setdefault("tolerance_grad", 10 * eps)
    # A loss change below eps happens long before the gradient is small (the change is quadratic
    # in the gradient), so by default only a zero step stops LBFGS early.
    merged.setdefault("tolerance_change", 0.0)
    return merged


def torch_optimizer_solver(optimizer_class: type[torch.optim.Optimizer]) -> TorchOptimizerSolver:
    """Wrap a ``torch.optim.Optimizer`` subclass into an inner solver.

    The solver creates the optimizer over detached copies of the parameters with ``lr=lr`` and
    the extra options, then calls ``optimizer.step(closure)`` ``steps`` times. The options it
    accepts are the optimizer's constructor arguments (``solve.accepted_options``), which
    :class:`~implicit_meta.ImplicitMetaOptimizer` checks when it is built.

    ``torch.optim.LBFGS`` is costly here: one ``step`` runs up to ``max_iter`` iterations (20 by
    default), each of one or more gradient evaluations, so ``inner_steps=K`` means up to ``20 K``
    iterations, an order of magnitude more time per task than the built-in ``"lbfgs"`` solver
    (the measured figures are in the settings guide's solver table). Prefer ``"lbfgs"``, where
    ``inner_steps`` is the iteration limit, or pass ``inner_options={"max_iter": 1}``. The
    adapter's LBFGS defaults are ``tolerance_grad = 10 * eps`` of the parameters' dtype and
    ``tolerance_change = 0`` instead of LBFGS's own (1e-7 and 1e-9), which stop long before a
    float64 problem is solved; options given by the user are passed through unchanged.

    Args:
        optimizer_class: A ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.Adam``.

    Returns:
        An inner solver ``solver(objective, params, *, steps, lr, **options)``, declared not
        vmappable (see :func:`vmap_unsupported_reason`).

    Raises:
        TypeError: If ``optimizer_class`` is not a ``torch.optim.Optimizer`` subclass.

    Example:
        >>> import torch
        >>> solve = torch_optimizer_solver(torch.optim.SGD)
        >>> f = lambda p: 0.5 * ((p["w"] - 3.0) ** 2).sum()
        >>> w = solve(f, {"w": torch.zeros(1)}, steps=50, lr=0.5)["w"]
        >>> round(float(w), 6)
        3.0
    """
    return TorchOptimizerSolver(optimizer_class)


class TorchOptimizerSolver:
    """An inner solver that runs a ``torch.optim.Optimizer`` subclass.

    :func:`torch_optimizer_solver` builds it. It is a callable object rather than a closure
    so that what the meta-optimizer reads from it is declared: ``optimizer_class`` (for
    checking option values at construction) and ``accepted_options`` (the constructor's
    keywords, read by :func:`check_solver_options`).

    Args:
        optimizer_class: A ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.Adam``.

    Raises:
        TypeError: If ``optimizer_class`` is not a ``torch.optim.Optimizer`` subclass.

    Example:
        >>> solve = TorchOptimizerSolver(torch.optim.Adam)
        >>> solve.__name__, "betas" in solve.accepted_options
        ('torch_optim_Adam', True)
    """

    __name__: str
    __qualname__: str

    def __init__(self, optimizer_class: type[torch.optim.Optimizer]) -> None:
        is_class = isinstance(optimizer_class, type)
        if not (is_class and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"expected a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        self.optimizer_class: type[torch.optim.Optimizer] = optimizer_class
        self.__name__ = f"torch_optim_{optimizer_class.__name__}"
        self.__qualname__ = self.__name__
        # The constructor's keywords beside params and lr are the options; read by
        # check_solver_options (ImplicitMetaOptimizer checks inner_options when it is built).
        # None (any option) when the signature cannot be read, as for a solver with **options.
        constructor = solver_options(optimizer_class.__init__)
        self.accepted_options: tuple[str, ...] | None = (
            None if constructor is None else constructor[0]
        )
        reason = f"torch.optim.{optimizer_class.__name__} mutates tensors and syncs with the host"
        declare_solver(self, vmappable=False, reason=reason)

    def __call__(
        self, objective: Objective, params: Params, *, steps: int, lr: float, **options: Any
    ) -> Params:
        """Run ``steps`` optimizer steps on ``objective`` from detached copies of ``params``.

        Args:
            objective: Full proximal inner objective.
            params: Starting point (the meta-parameters).
            steps: Number of ``optimizer.step(closure)`` calls.
            lr: The optimizer's learning rate.
            **options: The optimizer's other constructor arguments.

        Returns:
            The parameters after the last step, detached.
        """
        # Subclasses take ``lr`` (the base class's signature does not say so).
        make_optimizer: Callable[..., torch.optim.Optimizer] = self.optimizer_class
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        if issubclass(self.optimizer_class, torch.optim.LBFGS):
            options = _tight_lbfgs_tolerances(params, options)
        optimizer = make_optimizer(list(leaves.values()), lr=lr, **options)

        def closure() -> float:
            optimizer.zero_grad(set_to_none=False)
            loss = objective(leaves)
            gradients = torch.autograd.grad(loss, list(leaves.values()))
            for leaf, gradient in zip(leaves.values(), gradients, strict=True):
                leaf.grad = gradient
            # torch.optim's closures return the loss; LBFGS reads it as a tensor or a float.
            return loss.detach()  # type: ignore[return-value]

        with torch.enable_grad():
            for _ in range(steps):
                optimizer.step(closure)
        return {k: v.detach() for k, v in leaves.items()}

    def __repr__(self) -> str:
        return f"torch_optimizer_solver(torch.optim.{self.optimizer_class.__name__})"


def check_torch_optimizer_options(
    optimizer_class: type[torch.optim.Optimizer], lr: float, options: dict[str, Any]
) -> None:
    """Check option values by building the optimizer once over a one-element tensor.

    torch.optim validates its arguments in the constructor ("Invalid momentum value"), so this
    reports a bad value when the meta-optimizer is built rather than at the first task.

    Args:
        optimizer_class: The ``torch.optim.Optimizer`` subclass.
        lr: The inner learning rate.
        options: The ``inner_options``.

    Raises:
        ValueError: If the constructor rejects them; the message quotes torch's.

    Example:
        >>> check_torch_optimizer_options(torch.optim.SGD, 0.1, {"momentum": -1.0})
        Traceback (most recent call last):
        ...
        ValueError: inner_options rejected by torch.optim.SGD: Invalid momentum value: -1.0
    """
    probe = torch.zeros(1, requires_grad=True)
    make_optimizer: Callable[..., torch.optim.Optimizer] = optimizer_class
    try:
        make_optimizer([probe], lr=lr, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"inner_options rejected by torch.optim.{optimizer_class.__name__}: {error}"
        ) from None
