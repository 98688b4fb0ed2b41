"""The settings of a few-shot meta-training run, as a dataclass of plain Python values."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from implicit_meta.fewshot.meta_splits import DATASETS, PROTOCOLS
from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.functional.curvature import CURVATURES
from implicit_meta.functional.hvp import HVP_MODES
from implicit_meta.models.registry import check_backbone
from implicit_meta.problem import SHORTHANDS, InnerProblem, default_adjoint_for, resolve_problem

__all__ = [
    "ADAPT_CHOICES",
    "DATASETS",
    "DEVICES",
    "LR_SCHEDULES",
    "PROTOCOLS",
    "RESUMABLE_FIELDS",
    "TASK_STRATEGIES",
    "TrainConfig",
    "check_resumable",
    "field_choices",
    "field_type",
    "meta_lr_at",
]

ADAPT_CHOICES = ("all", "head")
"""What a run adapts per task: every parameter, or the classifier head on a shared body."""

DEVICES = ("auto", "cpu", "cuda")
"""Device choices; ``"auto"`` is CUDA when available, else the CPU."""

LR_SCHEDULES = ("cosine", "constant")
"""Meta-learning-rate schedules (see :func:`meta_lr_at`)."""

TASK_STRATEGIES = ("auto", "vmap", "loop")
"""How a meta-batch's tasks are solved (see
:meth:`~implicit_meta.ImplicitMetaOptimizer.meta_backward_batch`)."""

RESUMABLE_FIELDS = frozenset(
    {
        "meta_steps",
        "time_budget",
        "eval_episodes",
        "device",
        "threads",
        "log_every",
        "checkpoint_every",
        "root",
        "task_strategy",
        "compile_inner",
    }
)
"""Fields that may differ between a checkpoint and the run that resumes it.

They change how long or where a run goes on, not what it computes: the model, the optimiser,
the task distribution and the random streams stay those of the checkpoint. ``meta_steps`` is
resumable only with the constant schedule: under the cosine it sets the schedule's length (see
:func:`check_resumable`).
"""


_ADJOINT_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ImplicitAdjoint)}
"""The adjoint's defaults, which the run's adjoint fields share (one home for each value)."""


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    """A field that takes one of ``choices``; the command line offers them as its choices."""
    return dataclasses.field(default=default, metadata={"choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a meta-training run; stored in checkpoints as a plain dict.

    The defaults are the ``implicit-meta train`` defaults: 5-way 5-shot Omniglot (paper split
    with 100 of its meta-train characters held out for validation, rotations as extra classes),
    a 32-channel Conv4 whose linear head is adapted per task (``adapt="head"``: 8 dense Newton
    steps to stationarity at ``reg=0.5``) while its body is meta-learned through the exact
    implicit gradient (CG 20 on the head's system and the mixed term for the body), 4 tasks per
    meta-batch, and Adam at ``meta_lr`` with a cosine decay to 0 over a fixed number of
    meta-steps. The head study on the Benchmarks page chose it: it trained best on both seeds at
    5-way 1-shot, ahead of the whole network (first-order or Gauss-Newton) and of the head with
    the first-order gradient. ``adapt="all"`` gives the whole network: 5 inner SGD steps at 0.1
    with ``reg=1`` and the first-order meta-gradient, the best whole-network setting of the
    adjoint study. Nothing in the arithmetic depends on the clock: the same config gives the
    same checkpoint on the same machine. The measured accuracy and running time of the defaults
    are in the README, with the command that produced them.

    Attributes:
        dataset: ``"omniglot"`` or ``"mini-imagenet"``.
        root: Dataset folder; ``None`` uses the embedded Omniglot (Mini-ImageNet needs one).
        protocol: Omniglot split, ``"paper"`` or ``"lake"``.
        ways: Classes per task, N.
        shots: Support images per class, K.
        queries: Query images per class.
        backbone: Backbone spec for :func:`implicit_meta.models.create_backbone`.
        adapt: ``"head"`` (the default) adapts the classifier (``get_classifier()``) on
            features of a shared body, which is meta-learned through the exact implicit function
            theorem (see :class:`~implicit_meta.InnerProblem`); ``"all"`` adapts every
            parameter per task.
        inner: Registered inner solver name (see :func:`implicit_meta.list_inner_solvers`);
            ``None``: ``"sgd"`` for ``adapt="all"``, ``"newton"`` (dense Newton) for the head.
        inner_steps: Inner solver steps per task (``None``: 5 SGD steps, or 8 Newton steps).
        inner_lr: Inner learning rate (``None``: 0.1 for SGD, 1.0 for Newton steps).
        reg: Proximal regularisation strength lambda (``None``: 1 for ``adapt="all"``, 0.5
            for the head, the values of the head study on the Benchmarks page).
        curvature: Curvature of the adjoint system: ``"auto"`` (Gauss-Newton for the
            cross-entropy the trainer uses), ``"hessian"`` or ``"gauss_newton"`` (see
            :class:`~implicit_meta.functional.ImplicitAdjoint`).
        damping: ``delta >= 0`` added to the curvature's diagonal.
        curvature_scale: Factor on the curvature (1 but to reproduce another code's system).
        cg_steps: Conjugate-gradient iterations per task; ``0`` is first-order, the gradient
            of the query loss at the adapted parameters. ``None`` (the default) is first-order
            unless ``curvature``, ``damping`` or ``curvature_scale`` is set, then 5 (see
            :class:`~implicit_meta.functional.ImplicitAdjoint`); with ``adapt="head"`` it is
            the exact system with CG 20 (see :data:`~implicit_meta.problem.PARTIAL_CG_STEPS`).
        cg_tol: CG's relative residual tolerance.
        hvp: Hessian-vector product strategy (``"auto"``, ``"reverse_over_reverse"``,
            ``"forward_over_reverse"``).
        meta_batch: Tasks per meta-step.
        meta_steps: Number of meta-steps of the run (the cosine schedule spans them).
        meta_lr: Adam learning rate of the meta-parameters (the peak, with a schedule).
        lr_schedule: ``"cosine"`` decays the meta learning rate from ``meta_lr`` to 0 over
            ``meta_steps`` (see :func:`meta_lr_at`); ``"constant"`` keeps ``meta_lr``. The
            schedule is indexed by the meta-step, never by the clock.
        time_budget: Seconds of meta-training after which this call stops cleanly, with a
            checkpoint, so that ``resume`` continues it (``0``: none). It never changes what
            is computed: a run done in several budgeted calls equals one uninterrupted run.
        eval_episodes: Test episodes evaluated after training (``0``: skip). The untrained
            initialisation is scored on the same episodes, under the same adaptation.
        val_classes: Omniglot meta-train characters held out for validation (with their
            rotations left out of meta-training); Mini-ImageNet uses its own validation split
            and ignores this.
        val_episodes: Validation episodes scored every ``val_every`` meta-steps and at the
            start; the best-scoring parameters are kept in ``best.pt`` (``0``: no validation).
        val_every: Meta-steps between validations.
        seed: Seed of the initialisation and of the task streams.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: CPU threads for torch (``0``: one per core this process may run on, a
            number that does not depend on the machine's load; see
            :func:`~implicit_meta.fewshot.device.configure_threads`).
        log_every: Meta-steps between entries of ``metrics.jsonl``.
        checkpoint_every: Meta-steps between checkpoints (one is always written at the end).
        task_strategy: How the tasks of a meta-batch are solved: ``"vmap"`` (vectorised over
            tasks), ``"loop"`` (one after another) or ``"auto"`` (vmap on CUDA, the loop on the
            CPU); the meta-gradient is the same up to rounding.
        compile_inner: Compile the inner objective with ``torch.compile`` (see
            :class:`~implicit_meta.ImplicitMetaOptimizer`): faster inner steps after a first
            compilation of tens of seconds.

    Example:
        >>> config = TrainConfig(shots=1, meta_steps=10)
        >>> TrainConfig.from_dict(config.to_dict()) == config
        True
    """

    dataset: str = _choice("omniglot", DATASETS)
    root: str | None = None
    protocol: str = _choice("paper", PROTOCOLS)
    ways: int = 5
    shots: int = 5
    queries: int = 15
    backbone: str = "conv4-32"
    adapt: str = _choice("head", ADAPT_CHOICES)
    inner: str | None = None
    inner_steps: int | None = None
    inner_lr: float | None = None
    reg: float | None = None
    curvature: str = _choice(_ADJOINT_DEFAULTS["curvature"], CURVATURES)
    damping: float = _ADJOINT_DEFAULTS["damping"]
    curvature_scale: float = _ADJOINT_DEFAULTS["curvature_scale"]
    cg_steps: int | None = _ADJOINT_DEFAULTS["cg_steps"]
    cg_tol: float = _ADJOINT_DEFAULTS["cg_tol"]
    hvp: str = _choice(_ADJOINT_DEFAULTS["hvp"], HVP_MODES)
    meta_batch: int = 4
    meta_steps: int = 500
    meta_lr: float = 3e-3
    lr_schedule: str = _choice("cosine", LR_SCHEDULES)
    time_budget: float = 0.0
    eval_episodes: int = 600
    val_classes: int = 100
    val_episodes: int = 50
    val_every: int = 50
    seed: int = 0
    device: str = _choice("auto", DEVICES)
    threads: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    task_strategy: str = _choice("auto", TASK_STRATEGIES)
    compile_inner: bool = False

    def __post_init__(self) -> None:
        """Validate every field.

        Raises:
            ValueError: If a value is out of range or a choice is unknown.
            TypeError: If a value has the wrong type.
        """
        for name, (expected, optional) in _field_types().items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
                value = float(value)
            if (expected is not bool and isinstance(value, bool)) or not isinstance(
                value, expected
            ):
                kind = "True or False" if expected is bool else expected.__name__
                raise TypeError(
                    f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}"
                )
        for name, choices in field_choices().items():
            _check_choice(name, getattr(self, name), choices)
        for name in ("ways", "shots", "meta_batch", "log_every", "checkpoint_every", "val_every"):
            _check_min(name, getattr(self, name), 1)
        for name in (
            "queries",
            "inner_steps",
            "meta_steps",
            "eval_episodes",
            "val_classes",
            "val_episodes",
            "seed",
            "threads",
        ):
            if getattr(self, name) is not None:
                _check_min(name, getattr(self, name), 0)
        # The inner problem and the adjoint validate their own fields (the solver is registered,
        # its options and step suit it, curvature, damping, cg_steps, ...): every setting is
        # checked here, once, when the config is made.
        self.adjoint()
        if self.queries < 1:
            raise ValueError("queries must be at least 1 (the outer loss needs a query set)")
        for name in ("inner_lr", "meta_lr"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if not math.isfinite(self.time_budget) or self.time_budget < 0:
            raise ValueError(f"time_budget must be >= 0 seconds, got {self.time_budget}")
        check_backbone(self.backbone)  # registered, or a model timm knows; nothing is built
        if self.dataset == "omniglot" and self.val_episodes and not self.val_classes:
            raise ValueError(
                "val_episodes > 0 needs validation classes: set val_classes > 0 (Omniglot "
                "characters held out of meta-training) or val_episodes = 0 (no validation)"
            )
        if self.dataset == "omniglot" and self.val_episodes and self.val_classes < self.ways:
            raise ValueError(
                f"val_classes={self.val_classes} cannot form {self.ways}-way validation "
                f"episodes; hold out at least {self.ways} characters"
            )

    @property
    def proximal_reg(self) -> float:
        """``reg``, or its default for what adapts (see :class:`~implicit_meta.InnerProblem`).

        Example:
            >>> TrainConfig().proximal_reg, TrainConfig(adapt="all").proximal_reg
            (0.5, 1.0)
        """
        return self.inner_problem().reg

    def inner_problem(self) -> InnerProblem:
        """The inner problem of this run: what adapts, ``reg``, the solver and its settings.

        The fields named as :data:`~implicit_meta.problem.SHORTHANDS` are passed on as they
        are; those left ``None`` take the problem's defaults, the same as
        :class:`~implicit_meta.ImplicitMetaOptimizer`'s.

        Returns:
            The validated problem.

        Raises:
            ValueError: If the solver is not registered, or its step diverges at ``reg``.

        Example:
            >>> TrainConfig().inner_problem().solver
            'newton'
            >>> TrainConfig(adapt="all").inner_problem().steps
            5
        """
        shorthands = {
            field: getattr(self, name) for name, field in SHORTHANDS.items() if hasattr(self, name)
        }
        return resolve_problem(None, shorthands)

    def adjoint(self) -> ImplicitAdjoint:
        """The linear-solve settings of this run as an :class:`ImplicitAdjoint`.

        The fields named as :class:`ImplicitAdjoint`'s are passed on as they are, with the
        inner problem's ``reg``; a partial problem that leaves ``cg_steps`` unset takes the
        exact system (:func:`~implicit_meta.problem.default_adjoint_for`), as the
        meta-optimizer does.

        Returns:
            The adjoint with this config's ``reg``, curvature, damping and CG settings.

        Example:
            >>> TrainConfig(cg_steps=0).adjoint().first_order
            True
            >>> TrainConfig(adapt="head").adjoint().cg_steps  # the exact gradient of a head
            20
        """
        problem = self.inner_problem()
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ImplicitAdjoint)}
        return default_adjoint_for(problem, ImplicitAdjoint(**{**fields, "reg": problem.reg}))

    @classmethod
    def smoke(cls, **changes: Any) -> TrainConfig:
        """A run of a few seconds on the CPU, for examples and smoke tests, not for results.

        A 3-way 1-shot task on an 8-channel Conv4, 2 meta-steps of 2 tasks, 2 inner steps,
        CG 2 and 4 test episodes, without validation, on one CPU thread.

        Args:
            **changes: Fields to set otherwise.

        Returns:
            The config.

        Example:
            >>> TrainConfig.smoke(meta_steps=3).meta_steps
            3
        """
        tiny: dict[str, Any] = {
            "backbone": "conv4-8",
            "ways": 3,
            "shots": 1,
            "queries": 2,
            "inner_steps": 2,
            "cg_steps": 2,
            "meta_batch": 2,
            "meta_steps": 2,
            "eval_episodes": 4,
            "val_episodes": 0,
            "threads": 1,
            "device": "cpu",
        }
        return cls(**{**tiny, **changes})

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict of str, int, float and None (safe for ``weights_only`` loads).

        Returns:
            One entry per field.

        Example:
            >>> TrainConfig().to_dict()["ways"]
            5
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict` output; missing fields take their defaults.

        Args:
            values: Field names to values.

        Returns:
            The validated config.

        Raises:
            ValueError: If ``values`` holds an unknown field or an invalid value.

        Example:
            >>> TrainConfig.from_dict({"shots": 1}).shots
            1
        """
        unknown = set(values) - set(_field_types())
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again).

        Args:
            **changes: Field names to new values.

        Returns:
            The new config.

        Example:
            >>> TrainConfig().replace(ways=20).ways
            20
        """
        return dataclasses.replace(self, **changes)


def meta_lr_at(config: TrainConfig, step: int) -> float:
    """The meta learning rate of the meta-step that follows ``step`` completed steps.

    With ``lr_schedule="cosine"`` it is ``meta_lr * (1 + cos(pi * min(step, meta_steps) /
    meta_steps)) / 2``, from ``meta_lr`` at the first step to 0 after the last; with
    ``"constant"`` it is ``meta_lr``. It is a function of the step alone, so a resumed or a
    chunked run follows the same schedule as an uninterrupted one. The trainer steps the
    equivalent :mod:`torch.optim.lr_scheduler`
    (:func:`~implicit_meta.fewshot.builders.build_lr_scheduler`), whose state is saved in
    checkpoints; this closed form documents and tests it.

    Args:
        config: Supplies ``meta_lr``, ``lr_schedule`` and ``meta_steps``.
        step: Meta-steps completed.

    Returns:
        The learning rate, in ``[0, meta_lr]``.

    Example:
        >>> config = TrainConfig(meta_lr=1e-3, meta_steps=100)
        >>> meta_lr_at(config, 0), meta_lr_at(config, 50), meta_lr_at(config, 100)
        (0.001, 0.0005, 0.0)
    """
    if config.lr_schedule == "constant":
        return config.meta_lr
    progress = min(step, config.meta_steps) / config.meta_steps if config.meta_steps else 1.0
    # Rounded so that exact fractions print cleanly; far below float32 resolution.
    return round(config.meta_lr * 0.5 * (1.0 + math.cos(math.pi * progress)), 15)


def check_resumable(saved: TrainConfig, requested: TrainConfig) -> None:
    """Raise unless resuming ``saved`` as ``requested`` continues the same computation.

    ``requested`` may differ from ``saved`` only in :data:`RESUMABLE_FIELDS`, and in
    ``meta_steps`` only under the constant schedule: the cosine spans ``meta_steps``, so a
    different length would change every remaining learning rate.

    Args:
        saved: The config stored in the checkpoint.
        requested: The config of the resuming run.

    Raises:
        ValueError: Naming every field that would change what the run computes, and what to
            do instead.

    Example:
        >>> check_resumable(TrainConfig(), TrainConfig(time_budget=60, threads=1))
        >>> check_resumable(TrainConfig(), TrainConfig(ways=20))
        Traceback (most recent call last):
        ...
        ValueError: cannot resume with a different ways (checkpoint: 5, requested: 20)
    """
    old, new = saved.to_dict(), requested.to_dict()
    changed = [k for k in old if k not in RESUMABLE_FIELDS and old[k] != new[k]]
    if changed:
        details = ", ".join(f"{k} (checkpoint: {old[k]!r}, requested: {new[k]!r})" for k in changed)
        raise ValueError(f"cannot resume with a different {details}")
    if saved.lr_schedule == "cosine" and saved.meta_steps != requested.meta_steps:
        raise ValueError(
            f"cannot resume with meta_steps={requested.meta_steps}: the cosine schedule of "
            f"this run spans its meta_steps={saved.meta_steps}, and a different length would "
            "change every remaining learning rate. Resume with the same --meta-steps, or start "
            f"a new run with --meta-steps {requested.meta_steps} (split it into --time-budget "
            "chunks with --resume if it is long), or use --lr-schedule constant, whose runs can "
            "be extended"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_min(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def field_choices() -> dict[str, tuple[str, ...]]:
    """The fields of :class:`TrainConfig` that take one of a few names, with those names.

    Returns:
        Field name to its choices, in field order.

    Example:
        >>> field_choices()["adapt"]
        ('all', 'head')
    """
    return {
        f.name: f.metadata["choices"]
        for f in dataclasses.fields(TrainConfig)
        if "choices" in f.metadata
    }


def field_type(name: str) -> tuple[type, bool]:
    """A :class:`TrainConfig` field's value type, and whether it may be ``None``.

    Args:
        name: The field's name.

    Returns:
        The type read from the field's annotation, and whether it is optional.

    Example:
        >>> field_type("cg_steps"), field_type("meta_lr")
        ((<class 'int'>, True), (<class 'float'>, False))
    """
    return _field_types()[name]


@functools.cache
def _field_types() -> dict[str, tuple[type, bool]]:
    """Each TrainConfig field's type and whether it may be None, read from its annotation."""
    found: dict[str, tuple[type, bool]] = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint)
        if args:  # ``X | None``
            found[name] = (next(a for a in args if a is not type(None)), True)
        else:
            found[name] = (hint, False)
    return found
