"""``InnerProblem``: what each task's inner problem is, as one validated, frozen value.

The inner problem of a task is ``phi* = argmin_phi L_in(phi, w) + reg/2 ||phi - theta||^2``:
which parameters adapt (``phi``, with their meta-values ``theta`` as proximal centres; the
other trainable parameters ``w`` are shared and meta-learned without adapting), how strongly
they are held to ``theta`` (``reg``), and the solver that finds ``phi*`` with its steps, rate
and options. Beside it, :class:`~implicit_meta.ImplicitAdjoint` says how the meta-gradient's
linear system is solved, as optimistix keeps the problem, the solver and the adjoint apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, cast

from torch import nn

from implicit_meta._settings import check_inner_solver
from implicit_meta.functional._checks import check_bool, check_int, check_real
from implicit_meta.functional.adjoint import DEFAULT_REG, ImplicitAdjoint
from implicit_meta.functional.tree import Params
from implicit_meta.solvers.resolve import InnerSpec, resolve_inner_solver

__all__ = [
    "DEFAULT",
    "PARTIAL_CG_STEPS",
    "PARTIAL_DEFAULTS",
    "SHORTHANDS",
    "WHOLE_MODEL_DEFAULTS",
    "AdaptSpec",
    "InnerProblem",
    "adapted_parameter_names",
    "default_adjoint_for",
    "resolve_problem",
]

AdaptSpec = Union[str, Sequence[str], nn.Module, Callable[[str, nn.Parameter], bool]]  # noqa: UP007
"""Which parameters adapt: ``"all"``, ``"head"``, names or prefixes, a submodule, a predicate."""

WHOLE_MODEL_DEFAULTS: dict[str, Any] = {"solver": "sgd", "steps": 5, "lr": 0.1, "reg": DEFAULT_REG}
"""Solver, steps, rate and ``reg`` of an inner problem that adapts every trainable parameter.

The one set of defaults of the library: :class:`~implicit_meta.ImplicitMetaOptimizer`,
:func:`~implicit_meta.adapt`, :class:`~implicit_meta.fewshot.TrainConfig` and the command line
all take them from here. They are the best whole-network setting of the adjoint study on the
Benchmarks page (a few SGD steps and ``reg=1``).
"""

PARTIAL_DEFAULTS: dict[str, Any] = {"solver": "newton", "steps": 8, "lr": 1.0, "reg": 0.5}
"""Solver, steps, rate and ``reg`` of a partial inner problem (a head): dense Newton.

A head on fixed features is strictly convex (cross-entropy of a linear map, plus the proximal
term), so full Newton steps converge quadratically; ``tests/test_partial_adaptation.py`` checks
that these settings reach a relative stationarity of ``1e-4`` in float32 on few-shot heads.
``reg=0.5`` is the value of the head study on the Benchmarks page. A solver named for a part
keeps the steps and rate of :data:`WHOLE_MODEL_DEFAULTS`, and this ``reg``.
"""

DEFAULT: Any = None
"""The default of :class:`InnerProblem`'s ``reg``, ``solver``, ``steps`` and ``lr``: ``None``.

It stands for "the default of this kind of problem" (:data:`WHOLE_MODEL_DEFAULTS` or
:data:`PARTIAL_DEFAULTS`) and is resolved at construction, so that a built problem always holds
the values it runs with.
"""

SHORTHANDS = {
    "adapt": "adapt",
    "reg": "reg",
    "inner": "solver",
    "inner_steps": "steps",
    "inner_lr": "lr",
    "inner_options": "options",
    "compile_inner": "compile",
}
"""The keyword of each :class:`InnerProblem` field in the meta-optimizer and the run config.

:class:`~implicit_meta.ImplicitMetaOptimizer` takes ``inner_steps=`` for ``problem.steps``,
and :class:`~implicit_meta.fewshot.TrainConfig` holds the same names as fields (all but
``inner_options``), so that one name means one setting everywhere.
"""


PARTIAL_CG_STEPS = 20
"""CG steps of the exact implicit gradient that partial adaptation takes by default.

A head's system ``I + C/reg`` is positive definite and small, so CG converges in a few dozen
products, each of which touches the head alone; the head study on the Benchmarks page found the
exact gradient ahead of first-order there.
"""


@dataclass(frozen=True)
class InnerProblem:
    """The inner problem of every task: what adapts, ``reg``, and the solver that solves it.

    Attributes:
        adapt: Which trainable parameters adapt. ``"all"`` (the default) adapts every one, as
            iMAML does. ``"head"`` adapts the classifier that ``model.get_classifier()``
            returns (timm's contract; :class:`~implicit_meta.models.Conv4` has it), or the
            parameters under the prefix ``"head"`` for a model without it. A name or prefix
            (``"fc"``, ``"blocks.3"``) or a sequence of them, a submodule of the model, or a
            predicate ``(name, parameter) -> bool`` choose any subset. The other trainable
            parameters are shared meta-parameters: not adapted, meta-learned through the
            exact implicit function theorem (see the guide *Adapt part of the network*).
            Parameters with ``requires_grad=False`` stay constants either way.
        reg: Proximal strength ``lambda > 0``: how strongly ``phi`` is held to ``theta``
            (``None``: 1 for ``adapt="all"``, 0.5 for partial adaptation).
        solver: A registered inner solver name (see :func:`~implicit_meta.list_inner_solvers`),
            a solver function, or a ``torch.optim.Optimizer`` subclass. ``None`` takes
            ``"sgd"`` for ``adapt="all"`` and dense ``"newton"`` for partial adaptation, which
            solves a convex head to stationarity (:data:`PARTIAL_DEFAULTS`).
        steps: Inner solver steps (``None``: 5, or 8 Newton steps where ``solver`` is the
            partial default).
        lr: Inner learning rate (``None``: 0.1, or the full Newton step ``1.0`` where
            ``solver`` is the partial default).
        options: Extra keyword arguments for the solver, checked against its signature.
        compile: Compile the inner objective with ``torch.compile`` (opt-in; see
            :func:`~implicit_meta.functional.solve_inner`).

    Raises:
        ValueError: If a value is out of range, the solver or an option is unknown, or an SGD
            step diverges on the proximal term.
        TypeError: If a value has the wrong type.

    Example:
        >>> problem = InnerProblem(adapt="head", reg=0.5)
        >>> problem.solver, problem.steps, problem.lr, problem.partial
        ('newton', 8, 1.0, True)
        >>> InnerProblem.from_dict(problem.to_dict()) == problem
        True
    """

    adapt: AdaptSpec = "all"
    reg: float = DEFAULT
    solver: InnerSpec = DEFAULT
    steps: int = DEFAULT
    lr: float = DEFAULT
    options: Mapping[str, Any] | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        """Validate every field and fill the solver defaults of the kind of problem."""
        adapt = self.adapt
        if isinstance(adapt, list | tuple):
            if not adapt or not all(isinstance(a, str) and a for a in adapt):
                raise TypeError(f"adapt must list parameter names or prefixes, got {adapt!r}")
            adapt = tuple(adapt)
        elif isinstance(adapt, str):
            if not adapt:
                raise ValueError("adapt must not be empty: give 'all', 'head' or a name prefix")
        elif not isinstance(adapt, nn.Module) and not callable(adapt):
            raise TypeError(
                "adapt must be 'all', 'head', parameter names or prefixes, a submodule or a "
                f"predicate (name, parameter) -> bool, got {type(adapt).__name__}"
            )
        object.__setattr__(self, "adapt", adapt)
        reg = (PARTIAL_DEFAULTS if self.partial else WHOLE_MODEL_DEFAULTS)["reg"]
        reg = reg if self.reg is None else self.reg
        object.__setattr__(self, "reg", check_real(reg, "reg", positive=True))
        # Newton's defaults only where Newton is the default: a solver named for a part keeps
        # the usual steps and rate.
        newton = self.partial and self.solver is None
        defaults = PARTIAL_DEFAULTS if newton else WHOLE_MODEL_DEFAULTS
        solver: InnerSpec = defaults["solver"] if self.solver is None else self.solver
        steps = defaults["steps"] if self.steps is None else self.steps
        lr = defaults["lr"] if self.lr is None else self.lr
        object.__setattr__(self, "solver", solver)
        object.__setattr__(self, "steps", check_int(steps, "inner_steps", 0))
        object.__setattr__(self, "lr", check_real(lr, "inner_lr", positive=True))
        options = self.options
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"inner_options must be a dict or None, got {type(options).__name__}")
        object.__setattr__(self, "options", dict(options or {}))
        object.__setattr__(self, "compile", check_bool(self.compile, "compile_inner"))
        solver_fn, name = resolve_inner_solver(solver)
        settings = {"inner_lr": self.lr, "inner_options": self.options}
        check_inner_solver(solver_fn, name, settings, reg)
        object.__setattr__(self, "_solver_fn", solver_fn)
        object.__setattr__(self, "_solver_name", name)

    @property
    def partial(self) -> bool:
        """Whether only part of the trainable parameters adapts (``adapt != "all"``)."""
        return not (isinstance(self.adapt, str) and self.adapt == "all")

    @property
    def solver_fn(self) -> Callable[..., Params]:
        """The inner solver function that :attr:`solver` names."""
        fn: Callable[..., Params] = self._solver_fn  # type: ignore[attr-defined]
        return fn

    @property
    def solver_name(self) -> str | None:
        """The name that recreates the solver (``None`` for an unregistered function)."""
        name: str | None = self._solver_name  # type: ignore[attr-defined]
        return name

    def replace(self, **changes: Any) -> InnerProblem:
        """A copy with some fields changed (validated again).

        Args:
            **changes: Field names to new values.

        Returns:
            The new problem.

        Example:
            >>> InnerProblem().replace(reg=1.0).reg
            1.0
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self, adapted: Sequence[str] | None = None) -> dict[str, Any]:
        """The settings as plain Python values.

        Args:
            adapted: The resolved adapted names, stored in place of an ``adapt`` that is a
                submodule or a predicate (which cannot be stored).

        Returns:
            ``adapt`` (a string or a list of names), ``reg``, ``solver`` (its name, ``None``
            for an unregistered function), ``steps``, ``lr``, ``options``, ``compile``.

        Example:
            >>> InnerProblem(adapt=("fc",)).to_dict()["adapt"]
            ['fc']
        """
        adapt: Any = self.adapt
        if isinstance(adapt, tuple):
            adapt = list(adapt)
        elif not isinstance(adapt, str):
            adapt = list(adapted) if adapted is not None else None
        return {
            "adapt": adapt,
            "reg": self.reg,
            "solver": self.solver_name,
            "steps": self.steps,
            "lr": self.lr,
            "options": dict(self.options or {}),
            "compile": self.compile,
        }

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], *, solver: InnerSpec | None = None
    ) -> InnerProblem:
        """Rebuild a problem from :meth:`to_dict` output.

        Args:
            values: Field names to values.
            solver: The solver to use where ``values`` stores ``None`` (a function that is
                not registered by name).

        Returns:
            The validated problem.

        Raises:
            ValueError: For an unknown field, an invalid value, or an unstorable ``adapt`` or
                solver that is not passed again.

        Example:
            >>> InnerProblem.from_dict({"adapt": "head", "reg": 1.0}).solver
            'newton'
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown inner-problem settings: {sorted(unknown)}")
        fields = dict(values)
        if "adapt" in fields and fields["adapt"] is None:
            raise ValueError("these settings were saved without their adapt= parameters")
        if isinstance(fields.get("adapt"), list):
            fields["adapt"] = tuple(fields["adapt"])
        if "solver" in fields and fields["solver"] is None:
            if solver is None:
                raise ValueError(
                    "these settings were saved with an unregistered solver function, which "
                    "cannot be stored: pass it again"
                )
            fields["solver"] = solver
        return cls(**fields)

    def describe(self) -> str:
        """The problem in words, for logs.

        Returns:
            For example ``"adapt head, reg 0.5, newton x 8 at 1"``.

        Example:
            >>> InnerProblem(reg=1.0, steps=5).describe()
            'adapt all, reg 1, sgd x 5 at 0.1'
        """
        if isinstance(self.adapt, str):
            adapt = self.adapt
        elif isinstance(self.adapt, tuple):
            adapt = ", ".join(self.adapt)
        else:
            adapt = type(self.adapt).__name__
        solver = self.solver_name or getattr(self.solver_fn, "__name__", "custom solver")
        return f"adapt {adapt}, reg {self.reg:g}, {solver} x {self.steps} at {self.lr:g}"


def _classifier(model: nn.Module) -> nn.Module | None:
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return None
    classifier = get_classifier()
    return classifier if isinstance(classifier, nn.Module) else None


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def adapted_parameter_names(model: nn.Module, adapt: AdaptSpec) -> tuple[str, ...]:
    """The names of the trainable parameters of ``model`` that ``adapt`` selects.

    Args:
        model: The model.
        adapt: As :attr:`InnerProblem.adapt`.

    Returns:
        The selected names, in the model's parameter order.

    Raises:
        ValueError: If ``adapt`` selects no trainable parameter, names one that does not
            exist, or is ``"head"`` and selects every trainable parameter (the head would be
            the whole model, which ``"all"`` says plainly).

    Example:
        >>> from implicit_meta.models import Conv4
        >>> adapted_parameter_names(Conv4(5, width=4), "head")
        ('head.weight', 'head.bias')
    """
    named = list(model.named_parameters())
    trainable = [name for name, p in named if p.requires_grad]
    if isinstance(adapt, str) and adapt == "all":
        return tuple(trainable)
    what = repr(adapt)
    entries = (adapt,) if isinstance(adapt, str) else adapt
    says_head = isinstance(entries, tuple | list) and all("head" in e for e in entries)
    if isinstance(adapt, str) and adapt == "head" and _classifier(model) is not None:
        adapt = _classifier(model)  # type: ignore[assignment]
        what = "'head' (model.get_classifier())"
    if isinstance(adapt, nn.Module):
        ids = {id(p) for p in adapt.parameters()}
        if not ids <= {id(p) for _, p in named}:
            raise ValueError(f"adapt={what}: that module is not a submodule of the model")
        selected = [name for name, p in named if id(p) in ids and p.requires_grad]
        what = what if what.startswith("'head'") else f"a {type(adapt).__name__} submodule"
    elif isinstance(adapt, str | tuple | list):
        prefixes = (adapt,) if isinstance(adapt, str) else tuple(adapt)
        for prefix in prefixes:
            if not any(_matches(name, (prefix,)) for name, _ in named):
                tops = sorted({name.split(".")[0] for name, _ in named})
                raise ValueError(
                    f"adapt={what}: no parameter is named {prefix!r} or starts with "
                    f"'{prefix}.'; the model's top-level names are {', '.join(tops)}"
                )
        selected = [name for name in trainable if _matches(name, prefixes)]
    else:
        predicate = cast(Callable[[str, nn.Parameter], bool], adapt)
        selected = [name for name, p in named if p.requires_grad and predicate(name, p)]
        what = "the predicate"
    if not selected:
        raise ValueError(
            f"adapt={what} selects no trainable parameter (those it names have "
            "requires_grad=False); adapt trainable parameters, or use adapt='all'"
        )
    if len(selected) == len(trainable) and says_head:
        raise ValueError(
            f"adapt={what} selects every trainable parameter, so the 'head' is the whole "
            "model: use adapt='all' to adapt everything, or name the head's parameters"
        )
    return tuple(selected)


def resolve_problem(
    problem: InnerProblem | None,
    shorthands: Mapping[str, Any],
    adjoint: ImplicitAdjoint | None = None,
) -> InnerProblem:
    """The inner problem from ``problem=`` or from the meta-optimizer's shorthands.

    ``reg`` belongs to the problem. For code written before it did, an ``adjoint=`` whose
    ``reg`` was set supplies it when neither ``problem=`` nor ``reg=`` does.

    Args:
        problem: The problem given, or ``None``.
        shorthands: ``adapt``, ``reg``, ``solver``, ``steps``, ``lr``, ``options``,
            ``compile``; those set to ``None`` were not given.
        adjoint: The adjoint given, if any (only its ``reg`` is read).

    Returns:
        ``problem``, or one built from the shorthands.

    Raises:
        TypeError: If ``problem`` is not an :class:`InnerProblem`.
        ValueError: If a shorthand comes beside ``problem=``, or two ``reg`` values disagree.
    """
    given = {name: value for name, value in shorthands.items() if value is not None}
    # An adjoint built with reg= states it; one built without leaves it to the problem.
    given_reg = adjoint is not None and not getattr(adjoint, "_reg_derived", False)
    adjoint_reg = adjoint.reg if adjoint is not None and given_reg else None
    if problem is not None:
        if not isinstance(problem, InnerProblem):
            raise TypeError(f"problem must be an InnerProblem, got {type(problem).__name__}")
        if given:
            raise ValueError(
                f"{', '.join(f'{k}=' for k in given)} given beside problem=: set them on the "
                "problem instead (problem.replace(...))"
            )
        reg = problem.reg
    else:
        if "reg" not in given and adjoint_reg is not None:
            given["reg"] = adjoint_reg
        problem = InnerProblem(**given)
        reg = problem.reg
    if adjoint_reg is not None and adjoint_reg != reg:
        raise ValueError(
            f"reg={reg:g} of the inner problem and reg={adjoint_reg:g} of adjoint= disagree: "
            "reg belongs to the inner problem; set it there (reg= or problem=) only"
        )
    return problem


def default_adjoint_for(problem: InnerProblem, adjoint: ImplicitAdjoint) -> ImplicitAdjoint:
    """``adjoint``, or for a partial problem that chose no CG steps, the exact system.

    Where only a head adapts, the inner problem is convex and solved to stationarity, the
    conditions of the implicit function theorem hold, and the exact gradient is the default:
    ``curvature`` as given (``"auto"``: Gauss-Newton, which for a linear head under
    cross-entropy is the Hessian) with :data:`PARTIAL_CG_STEPS` CG steps. ``cg_steps=0`` given
    explicitly stays first-order; ``adapt="all"`` keeps the first-order default.

    Args:
        problem: The inner problem.
        adjoint: The adjoint as given or built from shorthands.

    Returns:
        The adjoint to use.

    Example:
        >>> default_adjoint_for(InnerProblem(adapt="head"), ImplicitAdjoint()).cg_steps
        20
        >>> default_adjoint_for(InnerProblem(), ImplicitAdjoint()).cg_steps
        0
    """
    chosen = not getattr(adjoint, "_cg_steps_derived", False)
    if problem.partial and adjoint.first_order and not chosen:
        return adjoint.replace(cg_steps=PARTIAL_CG_STEPS)
    return adjoint
