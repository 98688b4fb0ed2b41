"""From what ``ImplicitMetaOptimizer(inner=...)`` accepts to a solver function and its name.

The name is what :meth:`ImplicitMetaOptimizer.state_dict` stores to recreate the solver: a
registered name, ``"torch.optim.<Name>"`` for a torch.optim class, or ``None`` for a function
that is not registered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from implicit_meta._registry import close_matches, did_you_mean
from implicit_meta.functional.tree import Params
from implicit_meta.solvers.registry import (
    get_inner_solver,
    list_inner_solvers,
    registered_name,
)
from implicit_meta.solvers.torch_optim import torch_optimizer_solver

InnerSpec = str | Callable[..., Params] | type[torch.optim.Optimizer]
"""What ``inner=`` accepts: a registered name, a solver function, or a torch.optim class."""

_TORCH_OPTIM_PREFIX = "torch.optim."


def resolve_inner_solver(inner: InnerSpec) -> tuple[Callable[..., Params], str | None]:
    """The solver function for ``inner`` and the name that recreates it, if any.

    A string is a registered name, or ``"torch.optim.<Name>"`` for a ``torch.optim`` class
    (a registered name wins only when no such class exists). A ``torch.optim.Optimizer``
    subclass is wrapped by :func:`torch_optimizer_solver` and named after its place in
    ``torch.optim`` (``None`` for a class defined elsewhere). A function is used as it is and
    named by the registry, if it is registered.

    Args:
        inner: A registered name, a solver function, or a ``torch.optim.Optimizer`` subclass.

    Returns:
        ``(solver, name)``; ``name`` is ``None`` when nothing recreates the solver by name.

    Raises:
        ValueError: If a name is not registered (the message lists those that are, and the
            close matches), or ``"torch.optim.<Name>"`` names no ``torch.optim`` optimizer
            (the message names the close matches).
        TypeError: If ``inner`` is a class other than a ``torch.optim.Optimizer`` subclass, or
            neither a string nor callable.

    Example:
        >>> resolve_inner_solver("sgd")[1]
        'sgd'
        >>> resolve_inner_solver(torch.optim.Adam)[1]
        'torch.optim.Adam'
        >>> resolve_inner_solver("torch.optim.AdamWW")
        Traceback (most recent call last):
        ...
        ValueError: torch.optim has no optimizer 'AdamWW' (did you mean 'AdamW', ...?); ...
    """
    if isinstance(inner, str):
        if inner.startswith(_TORCH_OPTIM_PREFIX):
            optimizer_class = getattr(torch.optim, inner[len(_TORCH_OPTIM_PREFIX) :], None)
            if isinstance(optimizer_class, type) and issubclass(
                optimizer_class, torch.optim.Optimizer
            ):
                return torch_optimizer_solver(optimizer_class), inner
            if inner not in list_inner_solvers():
                raise _unknown_torch_optimizer(inner[len(_TORCH_OPTIM_PREFIX) :])
        return get_inner_solver(inner), inner
    if isinstance(inner, type):
        if issubclass(inner, torch.optim.Optimizer):
            name = None
            if getattr(torch.optim, inner.__name__, None) is inner:
                name = _TORCH_OPTIM_PREFIX + inner.__name__
            return torch_optimizer_solver(inner), name
        raise TypeError(f"inner class must be a torch.optim.Optimizer subclass, got {inner!r}")
    if callable(inner):
        return inner, registered_name(inner)
    raise TypeError(
        "inner must be a registered solver name, a solver function or a torch.optim.Optimizer "
        f"subclass, got {type(inner).__name__}"
    )


def _unknown_torch_optimizer(name: str) -> ValueError:
    """The error for ``"torch.optim.<name>"`` when ``torch.optim`` has no such optimizer."""
    optimizers = [
        attribute
        for attribute in dir(torch.optim)
        if isinstance(getattr(torch.optim, attribute), type)
        and issubclass(getattr(torch.optim, attribute), torch.optim.Optimizer)
        and attribute != "Optimizer"
    ]
    return ValueError(
        f"torch.optim has no optimizer {name!r}{did_you_mean(close_matches(name, optimizers))}; "
        "'torch.optim.<Name>' takes the name of a torch.optim.Optimizer subclass"
    )
