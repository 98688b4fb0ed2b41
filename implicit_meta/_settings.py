"""Checks of the meta-optimizer's arguments: model and optimizer, inner loop, saved settings.

Everything here runs when an :class:`~implicit_meta.ImplicitMetaOptimizer` is built or loads a
state dict, so that a bad setting fails there, with a message that names it, rather than at the
first task. The linear solve's own settings are checked by :class:`ImplicitAdjoint`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from implicit_meta.functional._checks import check_int, check_real
from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.functional.tree import Params
from implicit_meta.solvers.first_order import check_momentum, proximal_step_limit, sgd
from implicit_meta.solvers.registry import check_solver_options
from implicit_meta.solvers.torch_optim import TorchOptimizerSolver, check_torch_optimizer_options

if TYPE_CHECKING:
    from implicit_meta.problem import InnerProblem


def check_model_and_optimizer(model: object, outer_optimizer: object) -> None:
    """Refuse a model without trainable parameters, or an optimizer over other tensors.

    Args:
        model: What was given as the model.
        outer_optimizer: What was given as the outer optimizer.

    Raises:
        TypeError: If they are not an ``nn.Module`` and a ``torch.optim.Optimizer``.
        ValueError: If the model has no trainable parameter, or the optimizer holds a tensor
            that is not one of the model's parameters (its ``.grad`` would never be set).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(outer_optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"outer_optimizer must be a torch.optim.Optimizer, got {type(outer_optimizer).__name__}"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True)")
    model_ids = {id(p) for p in model.parameters()}
    for group in outer_optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in model_ids:
                raise ValueError(
                    "outer_optimizer holds a tensor that is not a parameter of the model "
                    f"(shape {tuple(param.shape)})"
                )


def unoptimized_warning(model: nn.Module, outer_optimizer: torch.optim.Optimizer) -> str | None:
    """The warning for trainable parameters that the outer optimizer does not hold, if any.

    Such parameters adapt to every task and get a ``.grad``, but no outer step ever moves them:
    the usual intent (meta-learn part of the model, adapt the rest) is ``adapt=``.

    Args:
        model: The model.
        outer_optimizer: The outer optimizer (already checked to hold only model parameters).

    Returns:
        The message naming those parameters and ``adapt=``, or ``None`` when it holds them all.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> unoptimized_warning(model, torch.optim.SGD(model.parameters(), 0.1)) is None
        True
        >>> unoptimized_warning(model, torch.optim.SGD(model[1].parameters(), 0.1))[:29]
        'the outer optimizer holds 2 o'
    """
    held = {id(p) for group in outer_optimizer.param_groups for p in group["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, param in trainable if id(param) not in held]
    if not missing:
        return None
    shown = ", ".join(repr(name) for name in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return (
        f"the outer optimizer holds {len(trainable) - len(missing)} of the model's "
        f"{len(trainable)} trainable parameters: the other {len(missing)} ({shown}) adapt to "
        "every task and get a .grad, but are never meta-updated. To meta-learn the whole model "
        "and adapt only part of it, give the optimizer every trainable parameter and choose "
        "what adapts with adapt= (ImplicitMetaOptimizer(..., adapt='head') adapts only the "
        "classifier and meta-learns the rest); to keep parameters fixed, set "
        "requires_grad_(False) on them"
    )


def settings_dict(
    problem: InnerProblem, adjoint: ImplicitAdjoint, adapted: tuple[str, ...]
) -> dict[str, Any]:
    """The meta-optimizer's settings as plain Python values (see :func:`restored_settings`).

    Args:
        problem: The inner problem.
        adjoint: The adjoint, with the problem's ``reg``.
        adapted: The adapted names (stored for an ``adapt`` that is a module or a predicate).

    Returns:
        ``adapt``, ``inner`` (the solver's name, ``None`` for an unregistered function),
        ``inner_steps``, ``inner_lr``, ``inner_options``, ``compile_inner`` and ``adjoint``.
    """
    return {
        "adapt": problem.to_dict(adapted)["adapt"],
        "inner": problem.solver_name,
        "inner_steps": problem.steps,
        "inner_lr": problem.lr,
        "inner_options": dict(problem.options or {}),
        "compile_inner": problem.compile,
        "adjoint": adjoint.to_dict(),
    }


def restored_settings(
    state_dict: object, problem: InnerProblem, adjoint: ImplicitAdjoint
) -> tuple[InnerProblem, ImplicitAdjoint]:
    """The inner problem and adjoint of a meta-optimizer's state dict, validated.

    Nothing is changed: the caller applies the result once everything else has loaded.

    Args:
        state_dict: ``{"outer_optimizer": ..., "settings": ...}``, the settings as
            :func:`settings_dict` wrote them: ``adjoint``, ``inner_steps``, ``inner_lr``, and
            optionally ``adapt``, ``inner``, ``inner_options`` and ``compile_inner``.
        problem: The current problem (its solver is kept where ``inner`` is ``None``, an
            unregistered function).
        adjoint: The current adjoint (its custom curvature function is kept likewise).

    Returns:
        ``(problem, adjoint)``, the adjoint with the problem's ``reg``.

    Raises:
        TypeError: If a setting has the wrong type.
        ValueError: If a key or a required setting is missing, or a value is invalid (checked
            as in the constructor).
    """
    from implicit_meta.problem import InnerProblem  # problem.py imports this module

    if not isinstance(state_dict, Mapping) or not {"outer_optimizer", "settings"} <= set(
        state_dict
    ):
        raise ValueError("state_dict must hold 'outer_optimizer' and 'settings'")
    settings = state_dict["settings"]
    if not isinstance(settings, Mapping):
        raise ValueError(f"state_dict settings must be a dict, got {type(settings).__name__}")
    missing = {"adjoint", "inner_steps", "inner_lr"} - set(settings)
    if missing:
        raise ValueError(f"state_dict settings lack {sorted(missing)}")
    if not isinstance(settings["adjoint"], Mapping):
        raise TypeError(f"settings['adjoint'] must be a dict, got {settings['adjoint']!r}")
    current = adjoint.curvature
    restored = ImplicitAdjoint.from_dict(
        settings["adjoint"], curvature=None if isinstance(current, str) else current
    )
    name, adapt = settings.get("inner"), settings.get("adapt", "all")
    loaded = InnerProblem(
        adapt=tuple(adapt) if isinstance(adapt, list) else adapt,
        reg=restored.reg,
        solver=problem.solver_fn if name is None else str(name),
        steps=check_int(settings["inner_steps"], "inner_steps", 0),
        lr=check_real(settings["inner_lr"], "inner_lr", positive=True),
        options=settings.get("inner_options"),
        compile=settings.get("compile_inner", False),
    )
    return loaded, restored


def resolve_adjoint(
    adjoint: ImplicitAdjoint | None, shorthands: Mapping[str, Any]
) -> ImplicitAdjoint:
    """The adjoint from ``adjoint=`` or from the ``reg=``/``cg_steps=``/... shorthands.

    Args:
        adjoint: The adjoint given, or ``None``.
        shorthands: The shorthand arguments; those set to ``None`` were not given.

    Returns:
        ``adjoint``, or one built from the shorthands.

    Raises:
        TypeError: If ``adjoint`` is not an :class:`ImplicitAdjoint`.
        ValueError: If both ``adjoint`` and a shorthand are given.
    """
    given = {name: value for name, value in shorthands.items() if value is not None}
    if adjoint is None:
        return ImplicitAdjoint(**given)
    if not isinstance(adjoint, ImplicitAdjoint):
        raise TypeError(f"adjoint must be an ImplicitAdjoint, got {type(adjoint).__name__}")
    if given:
        raise ValueError(
            f"{', '.join(f'{k}=' for k in given)} given beside adjoint=: set them on the adjoint "
            "instead (adjoint.replace(...))"
        )
    return adjoint


def check_inner_solver(
    solver: Callable[..., Params], inner_name: str | None, settings: Mapping[str, Any], reg: float
) -> None:
    """Check the solver against the (validated) inner settings: stability, then options.

    Args:
        solver: The inner solver.
        inner_name: Its name, if it has one.
        settings: ``inner_lr`` and ``inner_options``, already checked.
        reg: The proximal strength.

    Raises:
        ValueError: As :func:`check_inner_stability` and :func:`check_inner_options`.
    """
    lr, options = settings["inner_lr"], settings["inner_options"]
    check_inner_stability(solver, inner_name, lr, reg, options)
    check_inner_options(solver, inner_name, lr, options)


def check_inner_options(
    solver: Callable[..., Params], inner_name: str | None, lr: float, options: dict[str, Any]
) -> None:
    """Refuse ``inner_options`` the solver does not take, or values torch.optim rejects.

    Args:
        solver: The inner solver.
        inner_name: Its name for the messages, if it has one.
        lr: The inner learning rate (a torch.optim optimizer is built with it to check values).
        options: The ``inner_options``.

    Raises:
        ValueError: If an option is unknown, missing or rejected.
    """
    check_solver_options(solver, options, inner_name)
    if isinstance(solver, TorchOptimizerSolver):
        check_torch_optimizer_options(solver.optimizer_class, lr, options)


def check_inner_stability(
    solver: Callable[..., Params],
    inner_name: str | None,
    lr: float,
    reg: float,
    options: Mapping[str, Any],
) -> None:
    """Refuse an invalid SGD momentum, or an SGD step that diverges on the proximal term alone.

    The proximal term ``reg/2 ||phi - theta||^2`` alone makes SGD diverge once ``lr * reg``
    reaches a limit set by the momentum, whatever the task; that is known before any task runs.

    Args:
        solver: The inner solver (only ``"sgd"`` and ``"torch.optim.SGD"`` are checked).
        inner_name: Its name, if it has one.
        lr: The inner learning rate.
        reg: The proximal strength.
        options: The ``inner_options`` (``momentum``, ``nesterov``).

    Raises:
        ValueError: If the momentum is outside ``[0, 1)`` or ``lr * reg`` reaches the limit.
    """
    if solver is not sgd and inner_name != "torch.optim.SGD":
        return
    momentum, nesterov = options.get("momentum", 0.0), options.get("nesterov", False)
    if not isinstance(momentum, numbers.Real) or not isinstance(nesterov, bool):
        return  # the solver reports its own type errors
    momentum = check_momentum(momentum)
    limit = proximal_step_limit(momentum, nesterov)
    if lr * reg >= limit:
        kind = "Nesterov momentum " if nesterov else ("momentum " if momentum else "")
        raise ValueError(
            f"inner_lr * reg = {lr * reg:g} diverges: SGD with {kind}{momentum:g} contracts the "
            f"proximal term reg/2 ||phi - theta||^2 only for inner_lr * reg < {limit:g}; "
            f"use inner_lr < {limit / reg:g} at reg={reg:g}"
        )
