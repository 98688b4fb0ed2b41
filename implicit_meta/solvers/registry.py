"""The inner-solver registry: ``@register_inner_solver``, lookups by name, and capabilities.

Like timm's ``@register_model``, the decorator records a plain function and returns it unchanged,
so a solver stays an ordinary, testable function. What a solver can do beyond its signature
(whether it runs under ``torch.func.vmap``) is recorded beside it, not on it. Names, lookups and
listing are those of the shared :class:`~implicit_meta._registry.Registry`, as for backbones.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

from torch import Tensor

from implicit_meta._registry import Registry
from implicit_meta.functional._checks import check_bool
from implicit_meta.functional.tree import Params

Objective = Callable[[Params], Tensor]
"""The full proximal inner objective ``L_in(phi) + reg/2 ||phi - theta||^2`` of a parameter dict."""


class InnerSolver(Protocol):
    """What an inner solver is: a function from an objective and a start to adapted parameters.

    ``objective(params)`` returns a scalar tensor and can be differentiated with ``torch.func``
    (or autograd on leaves that require grad); ``params`` holds detached tensors that start at
    the meta-parameters. The solver returns a dict with the same keys and shapes.

    A solver that cannot run under ``torch.func.vmap`` (it syncs with the host or mutates
    tensors) says so in the registry,
    ``@register_inner_solver(name, vmappable=False, reason=...)`` (or :func:`declare_solver` for
    one not registered by name); :meth:`ImplicitMetaOptimizer.meta_backward_batch` then loops
    over tasks without trying vmap.
    Otherwise vmap is tried and a failure falls back to the loop with a warning.

    The options a solver accepts (``inner_options``) are read from its signature: the keyword
    parameters beside ``steps`` and ``lr`` (see :func:`check_solver_options`). A solver that
    takes ``**options`` accepts any, unless it carries an attribute ``accepted_options``, a tuple
    of the names it does accept.

    Example:
        >>> import torch
        >>> def one_step(objective, params, *, steps, lr):
        ...     grads = torch.func.grad(objective)(params)
        ...     return {k: v - lr * grads[k] for k, v in params.items()}
        >>> solver: InnerSolver = one_step
        >>> solver(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, steps=1, lr=0.25)["w"]
        tensor([0.5000, 0.5000])
    """

    def __call__(
        self, objective: Objective, params: Params, *, steps: int, lr: float, **options: Any
    ) -> Params:
        """Minimise ``objective`` from ``params`` and return the result."""
        ...


SolverT = TypeVar("SolverT", bound=Callable[..., Params])


@dataclass(frozen=True)
class _SolverSpec:
    """What the registry knows of a solver beyond its signature."""

    vmappable: bool = True
    reason: str | None = None  # why it cannot be vmapped, for the fallback warning


def _spec(vmappable: bool, reason: str | None) -> _SolverSpec:
    # A fallback warning without a reason would leave the user guessing, and a reason on a
    # vmappable solver would never be shown: both are mistakes worth stopping at registration.
    if check_bool(vmappable, "vmappable") and reason is not None:
        raise ValueError("reason= is only for a solver registered with vmappable=False")
    if not vmappable and not (isinstance(reason, str) and reason):
        raise ValueError("a solver with vmappable=False needs reason=, a non-empty string")
    return _SolverSpec(vmappable, reason)


@dataclass(frozen=True)
class _Registered:
    """A registered solver and what the registry knows of it."""

    solver: Callable[..., Params]
    spec: _SolverSpec


_SOLVERS: Registry[_Registered] = Registry(
    "inner solver",
    decorator="register_inner_solver",
    hint=" (register your own with implicit_meta.register_inner_solver)",
)
# Specs of solvers built on the fly (torch_optimizer_solver) that are not registered by name;
# weak keys, so that a solver built per call is not kept alive by its spec.
_DECLARED: weakref.WeakKeyDictionary[Callable[..., Params], _SolverSpec] = (
    weakref.WeakKeyDictionary()
)


@overload
def register_inner_solver(name: SolverT, /) -> SolverT: ...


@overload
def register_inner_solver(
    name: str | None = None,
    *,
    overwrite: bool = False,
    vmappable: bool = True,
    reason: str | None = None,
) -> Callable[[SolverT], SolverT]: ...


def register_inner_solver(
    name: str | SolverT | None = None,
    *,
    overwrite: bool = False,
    vmappable: bool = True,
    reason: str | None = None,
) -> SolverT | Callable[[SolverT], SolverT]:
    """Register an inner solver, by default under its function's name; it is returned unchanged.

    Like timm's ``@register_model``: ``@register_inner_solver`` and ``@register_inner_solver()``
    register the function under its ``__name__``, ``@register_inner_solver("name")`` under
    ``"name"``. Registering the same function again with the same options changes nothing.

    Args:
        name: Name for ``ImplicitMetaOptimizer(inner=name)``; default the function's name.
            (Used bare, as ``@register_inner_solver``, this is the function itself.)
        overwrite: Replace an existing registration of the same name instead of raising.
        vmappable: Whether the solver can run under ``torch.func.vmap``. ``False`` makes
            :meth:`ImplicitMetaOptimizer.meta_backward_batch` loop over tasks without trying
            vmap first (see :func:`vmap_unsupported_reason`).
        reason: Why the solver cannot be vmapped (required with ``vmappable=False``); it is
            quoted in the warning of a ``strategy="vmap"`` call that falls back to the loop.

    Returns:
        A decorator that records the function and returns it as it was; used bare, the
        function itself, registered.

    Raises:
        ValueError: If ``name`` is empty or already taken by another solver (and ``overwrite``
            is false), the function has no usable name (a lambda) and none is given, or
            ``reason`` is missing with ``vmappable=False`` or given with ``vmappable=True``.
        TypeError: If ``vmappable`` is not a bool.

    Example:
        >>> import torch
        >>> @register_inner_solver("gd_doc_example")
        ... def gd(objective, params, *, steps, lr):
        ...     for _ in range(steps):
        ...         grads = torch.func.grad(objective)(params)
        ...         params = {k: v - lr * grads[k] for k, v in params.items()}
        ...     return params
        >>> list_inner_solvers("gd_doc*")
        ['gd_doc_example']
        >>> unregister_inner_solver("gd_doc_example")
        >>> @register_inner_solver
        ... def keep_start(objective, params, *, steps, lr):
        ...     return params
        >>> get_inner_solver("keep_start") is keep_start
        True
        >>> unregister_inner_solver("keep_start")
    """
    if callable(name):
        # Used bare: ``@register_inner_solver`` hands the function over as ``name``.
        return register_inner_solver()(name)
    spec = _spec(vmappable, reason)
    return _SOLVERS.decorator_for(
        name, lambda solver: _Registered(solver, spec), overwrite=overwrite
    )


def declare_solver(
    solver: SolverT, *, vmappable: bool = True, reason: str | None = None
) -> SolverT:
    """Record what a solver that is not registered by name can do; it is returned unchanged.

    :func:`torch_optimizer_solver` declares its solvers this way: they are built on the fly, and
    a meta-batch should loop over them without trying vmap, registered or not. The declaration
    belongs to the function object and lasts as long as it does.

    Args:
        solver: An inner solver (a function, or any callable that takes weak references).
        vmappable: Whether it can run under ``torch.func.vmap``.
        reason: Why it cannot (required with ``vmappable=False``).

    Returns:
        ``solver``, unchanged.

    Raises:
        ValueError: If ``reason`` is missing with ``vmappable=False`` or given with
            ``vmappable=True``.
        TypeError: If ``vmappable`` is not a bool, or ``solver`` takes no weak references.

    Example:
        >>> def host_sync_gd(objective, params, *, steps, lr):
        ...     return params
        >>> _ = declare_solver(host_sync_gd, vmappable=False, reason="it calls .item()")
        >>> vmap_unsupported_reason(host_sync_gd)
        'it calls .item()'
    """
    _DECLARED[solver] = _spec(vmappable, reason)
    return solver


def vmap_unsupported_reason(solver: Callable[..., Params]) -> str | None:
    """Why ``solver`` cannot run under ``torch.func.vmap``, or ``None`` if nothing says so.

    The reason comes from :func:`declare_solver` or from a registration with
    ``vmappable=False``; either is enough. ``None`` means vmap is worth trying, not that it
    will work: :meth:`ImplicitMetaOptimizer.meta_backward_batch` still falls back to the loop
    when it fails.

    Args:
        solver: An inner solver.

    Returns:
        The reason, or ``None``.

    Example:
        >>> vmap_unsupported_reason(get_inner_solver("lbfgs"))
        'lbfgs runs torch.optim.LBFGS, whose line search branches on values on the host'
        >>> vmap_unsupported_reason(get_inner_solver("sgd")) is None
        True
    """
    try:
        declared = _DECLARED.get(solver)
    except TypeError:  # a callable that is unhashable or takes no weak references
        declared = None
    specs = [declared] if declared is not None else []
    specs += [entry.spec for _, entry in _SOLVERS.items() if entry.solver is solver]
    return next((spec.reason for spec in specs if not spec.vmappable), None)


def unregister_inner_solver(name: str) -> None:
    """Remove a registered inner solver.

    Args:
        name: Registered name.

    Raises:
        KeyError: If nothing is registered under ``name`` (the message names close matches).

    Example:
        >>> register_inner_solver("tmp_doc_solver")(lambda objective, params, *, steps, lr: params)
        <function <lambda> at ...>
        >>> unregister_inner_solver("tmp_doc_solver")
    """
    _SOLVERS.remove(name)


def list_inner_solvers(pattern: str | None = None) -> list[str]:
    """Names of the registered inner solvers, sorted; those matching ``pattern`` if given.

    Args:
        pattern: A shell-style pattern (``*``, ``?``, ``[seq]``, case-sensitive), as in timm's
            ``list_models("resnet*")``.

    Returns:
        The sorted names.

    Example:
        >>> {"sgd", "adam", "lbfgs", "newton_cg"} <= set(list_inner_solvers())
        True
        >>> list_inner_solvers("newton*")
        ['newton', 'newton_cg']
    """
    return _SOLVERS.names(pattern)


def get_inner_solver(name: str) -> Callable[..., Params]:
    """Look up a registered inner solver by name.

    Args:
        name: Registered name.

    Returns:
        The solver function.

    Raises:
        ValueError: If ``name`` is not registered; the message names the close matches and
            lists every registered solver.

    Example:
        >>> get_inner_solver("sgd").__name__
        'sgd'
        >>> get_inner_solver("bfgs")
        Traceback (most recent call last):
        ...
        ValueError: unknown inner solver 'bfgs' (did you mean 'lbfgs'?); registered inner ...
    """
    return _SOLVERS.get(name).solver


def registered_name(fn: Callable[..., Params]) -> str | None:
    """The name ``fn`` is registered under, or ``None``.

    Args:
        fn: A solver function.

    Returns:
        The first registered name (in sorted order) whose function is ``fn``, else ``None``.

    Example:
        >>> registered_name(get_inner_solver("adam"))
        'adam'
    """
    return next((name for name, entry in _SOLVERS.items() if entry.solver is fn), None)


_RESERVED = ("steps", "lr")


def solver_options(solver: Callable[..., Any]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The options a solver accepts and those it requires, read from its signature.

    Options are the keyword parameters after the first two (the objective and the start),
    ``steps`` and ``lr`` excepted. A solver attribute ``accepted_options`` (a tuple of names)
    takes precedence over the signature.

    Args:
        solver: An inner solver.

    Returns:
        ``(accepted, required)``, or ``None`` when any option is accepted (the solver takes
        ``**options`` without ``accepted_options``, or its signature cannot be read).

    Example:
        >>> solver_options(get_inner_solver("sgd"))
        (('momentum', 'nesterov'), ())
    """
    declared = getattr(solver, "accepted_options", None)
    if declared is not None:
        return tuple(declared), ()
    try:
        signature = inspect.signature(solver)
    except (TypeError, ValueError):
        return None
    accepted: list[str] = []
    required: list[str] = []
    positional = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY and positional < 2:
            positional += 1  # the objective and the start
            continue
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY or parameter.name in _RESERVED:
            continue
        accepted.append(parameter.name)
        if parameter.default is inspect.Parameter.empty:
            required.append(parameter.name)
    return tuple(accepted), tuple(required)


def check_solver_options(
    solver: Callable[..., Params], options: Mapping[str, Any], name: str | None = None
) -> None:
    """Raise a clear error unless ``solver`` accepts every key of ``options``.

    Args:
        solver: An inner solver.
        options: The ``inner_options`` meant for it.
        name: The solver's name for the message (default: its registered or function name).

    Raises:
        ValueError: If ``options`` sets ``steps`` or ``lr`` (``inner_steps`` and ``inner_lr``
            do), names an option the solver does not take (the message lists those it takes),
            or leaves out one it requires.

    Example:
        >>> check_solver_options(get_inner_solver("sgd"), {"momentun": 0.9})
        Traceback (most recent call last):
        ...
        ValueError: inner_options has 'momentun', which the inner solver 'sgd' does not take; ...
    """
    label = name or registered_name(solver) or getattr(solver, "__name__", repr(solver))
    reserved = [key for key in _RESERVED if key in options]
    if reserved:
        raise ValueError(
            f"inner_options may not set {', '.join(map(repr, reserved))}: "
            "use inner_steps= and inner_lr="
        )
    signature = solver_options(solver)
    if signature is None:
        return
    accepted, required = signature
    unknown = [key for key in options if key not in accepted]
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ValueError(
            f"inner_options has {', '.join(map(repr, unknown))}, which the inner solver "
            f"{label!r} does not take; it takes: {takes}"
        )
    missing = [key for key in required if key not in options]
    if missing:
        raise ValueError(
            f"the inner solver {label!r} requires inner_options {', '.join(map(repr, missing))}"
        )
