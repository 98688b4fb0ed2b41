"""What a meta-step reports when it goes wrong: non-finite results, curvature, batches, modes.

The meta-optimizer checks the results after the tasks are solved and before anything is
written into ``p.grad``, so a failed check leaves the model and its gradients as they were; the
batch errors are named where torch raises them, and nothing is checked before that.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from implicit_meta.functional.cg import CGStatus
from implicit_meta.functional.implicit import TaskGradient
from implicit_meta.functional.tree import Params
from implicit_meta.module_losses import dtype_mismatch

CURVATURE_REMEDY = (
    "Remedy: the positive semidefinite Gauss-Newton curvature: state the inner loss as "
    "im.output_loss(F.cross_entropy) (curvature='auto' then picks it), or "
    "adjoint=ImplicitAdjoint(curvature='gauss_newton'), or the first-order meta-gradient "
    "(the default, cg_steps=0), which trained as well or better in the adjoint study; a larger "
    "reg does not "
    "help on ReLU networks (docs: Benchmarks, adjoint study)"
)
"""The fix suggested when CG meets non-positive curvature (the study is on the Benchmarks page)."""


EVAL_MODE_REMEDY = (
    "call model.train() before adapting or meta-training (MAML and iMAML adapt and evaluate "
    "every task in training mode; meta-training never changes the running statistics, see the "
    "guide BatchNorm and buffers)"
)
"""The fix named when a model with running statistics is adapted in eval mode."""

DIVERGED_STATIONARITY = 1.0 + 1e-3
"""Relative stationarity above which an inner solve is reported as diverging.

``1`` is where the solve ends as far from stationary as it started (``phi = theta`` gives
exactly that); the margin keeps a solve that did not move from being reported for rounding.
"""


def eval_mode_warning(model: nn.Module) -> str | None:
    """The warning for a model in eval mode whose layers then use running statistics, if any.

    Only layers that behave differently in eval mode count: BatchNorm (and InstanceNorm) with
    ``track_running_stats=True``. Those built with ``track_running_stats=False``, as the
    library's :class:`~implicit_meta.models.Conv4` is, use batch statistics in both modes.
    Reads module attributes only (no tensor is touched).

    Args:
        model: The model about to be adapted or meta-trained.

    Returns:
        The message naming the first such layer and the fix, or ``None`` when the model is in
        training mode or has no such layer.

    Example:
        >>> from torch import nn
        >>> eval_mode_warning(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()) is None
        True
        >>> eval_mode_warning(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval())[:30]
        'the model is in eval mode, so '
    """
    if model.training:
        return None
    for name, module in model.named_modules():
        if (
            isinstance(module, _NormBase)
            and module.track_running_stats
            and module.running_mean is not None
            and not module.training
        ):
            layer = f"{type(module).__name__} {name!r}" if name else type(module).__name__
            return (
                f"the model is in eval mode, so its batch-statistics layers ({layer}) normalise "
                "with their running statistics instead of the task's batch; adapted to a task "
                "this way, such a model can score at chance, and it is meta-trained on what it "
                f"will not compute in training mode: {EVAL_MODE_REMEDY} (shown once)"
            )
    return None


@contextlib.contextmanager
def naming_batch_errors(
    theta: Params,
    support: Any,
    query: Any,
    *,
    call: str = "meta_backward",
    errors: tuple[type[Exception], ...] = (RuntimeError, IndexError),
) -> Iterator[None]:
    """Turn torch's errors for a batch the model cannot take into errors that name the fix.

    Nothing is checked up front (a model may cast or move its inputs itself): only when the
    call fails are the batches compared with the parameters and the message with known causes
    (:func:`batch_error_hint`), so this costs nothing on the way.

    Args:
        theta: The model's trainable parameters.
        support: The support batch (or one task's).
        query: The query batch, or ``None``.
        call: The library call, ``"meta_backward"``, ``"meta_backward_batch"`` or ``"adapt"``:
            a meta-batch given to the single-task calls is named.
        errors: The exception types to look at (where a ``RuntimeError`` has another meaning,
            a reason to fall back from vmap, only ``IndexError``).

    Yields:
        Nothing; an error of those types raised inside becomes a ``ValueError`` that names the
        cause when it is recognised (the original chained), and is re-raised unchanged
        otherwise.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except errors as error:
        problem = batch_error_hint(error, theta, {"support": support, "query": query}, call)
        if problem is None:
            raise
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{problem} (torch: {first_line})") from error


_TORCH_DTYPE_NAMES = {
    torch.uint8: ("Byte", "unsigned char"),
    torch.int8: ("Char", "signed char"),
    torch.int16: ("Short", "short int"),
    torch.int32: ("Int", "int"),
    torch.int64: ("Long", "long int"),
}


_INTEGER_TARGETS = (
    r"Found dtype (Long|Int|Short|Char|Byte) but expected|"
    r"can't be cast to the desired output type (Long|Int|Short|Char|Byte)"
)
"""Torch's words for integer targets given to a loss of floating-point targets."""


def _leaves(batch: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(batch) if isinstance(leaf, Tensor)]


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_mismatch(theta: Params, batches: Mapping[str, Any]) -> str | None:
    devices = {v.device for v in theta.values()}
    for what, batch in batches.items():
        for leaf in _leaves(batch):
            if leaf.device not in devices:
                model = sorted(str(d) for d in devices)
                return (
                    f"device mismatch: the model's parameters are on {', '.join(model)} but the "
                    f"{what} batch holds a tensor on {leaf.device} (shape {tuple(leaf.shape)}); "
                    f"move the batch (x.to({model[0]!r})) or the model "
                    f"(model.to({str(leaf.device)!r}))"
                )
    return None


def _integer_inputs(message: str, theta: Params, batches: Mapping[str, Any]) -> str | None:
    # Integer inputs meeting floating-point weights: raw image bytes, most often.
    floats = sorted({_short(v.dtype) for v in theta.values() if v.is_floating_point()})
    for what, batch in batches.items():
        for leaf in _leaves(batch):
            names = _TORCH_DTYPE_NAMES.get(leaf.dtype, ())
            if leaf.dim() < 2 or not any(name in message for name in names):
                continue
            uint8 = leaf.dtype == torch.uint8
            fix = "x.float() / 255 (image bytes to [0, 1])" if uint8 else "x.float()"
            return (
                f"the {what} batch holds a {_short(leaf.dtype)} tensor of shape "
                f"{tuple(leaf.shape)} but the model's parameters are {', '.join(floats)}: "
                f"inputs must be floating point; convert them with {fix}"
            )
    return None


def _float_labels(batches: Mapping[str, Any]) -> str:
    for what, batch in batches.items():
        for leaf in _leaves(batch)[1:]:
            if leaf.is_floating_point():
                return (
                    f"cross-entropy takes class labels as int64 indices, but the {what} batch "
                    f"holds {_short(leaf.dtype)} labels (shape {tuple(leaf.shape)}); convert "
                    "them with y.long()"
                )
    return (
        "cross-entropy takes class labels as int64 indices, not floating-point values; "
        "convert them with y.long()"
    )


def _meta_batch(batches: Mapping[str, Any], call: str) -> str | None:
    # A [T, ...] meta-batch given to a single-task call: labels of shape [T, N].
    for what, batch in batches.items():
        leaves = _leaves(batch)
        for leaf in leaves:
            integer = not leaf.is_floating_point() and leaf.dtype != torch.bool
            stacked = leaves[0].dim() >= 3 and leaves[0].shape[0] == leaf.shape[0]
            if integer and leaf.dim() == 2 and stacked:
                tasks = leaf.shape[0]
                fix = (
                    "adapt one task at a time, with (x[t], y[t])"
                    if call == "adapt"
                    else "pass the meta-batch to meta_backward_batch, or one task's batch "
                    "(x[t], y[t]) to meta_backward"
                )
                return (
                    f"the {what} batch looks like a meta-batch of {tasks} tasks (labels of shape "
                    f"{tuple(leaf.shape)}, inputs of shape {tuple(leaves[0].shape)}), but {call} "
                    f"takes one task's batch: {fix}"
                )
    return None


def _label_out_of_range(label: int, batches: Mapping[str, Any]) -> str:
    # Only on the error path: reading the labels here costs a sync nobody else pays.
    where = ""
    for what, batch in batches.items():
        for leaf in _leaves(batch):
            integer = not leaf.is_floating_point() and leaf.dtype != torch.bool
            if integer and bool((leaf == label).any()):
                where = f" of the {what} batch"
                break
        if where:
            break
    return (
        f"a label{where} ({label}) is outside the model's classes: cross-entropy takes labels "
        "0..C-1 for a model with C outputs; number each task's classes 0..N-1, the same way "
        "in the support and the query, and keep the query's labels among the support's classes"
    )


def batch_error_hint(
    error: BaseException, theta: Params, batches: Mapping[str, Any], call: str
) -> str | None:
    """Name the cause of torch's error for a batch, where it is one users commonly make.

    Recognised: parameters and batch on different devices, floating-point batches of another
    dtype than the model, integer inputs (uint8 images), floating-point labels for
    cross-entropy (integer targets for a regression loss), a label outside the model's
    classes, and (for ``call`` other than ``"meta_backward_batch"``) a ``[T, ...]``
    meta-batch given as one task's batch.

    Args:
        error: What torch raised.
        theta: The model's trainable parameters.
        batches: Batches by name (``"support"``, ``"query"``); ``None`` entries are skipped.
        call: The library call the batches were given to.

    Returns:
        A sentence naming the cause and the fix, or ``None`` when none is recognised.

    Example:
        >>> import torch
        >>> error = IndexError("Target 3 is out of bounds.")
        >>> batch_error_hint(error, {}, {"query": None}, "meta_backward")[:40]
        "a label (3) is outside the model's class"
    """
    message = str(error)
    present = {k: v for k, v in batches.items() if v is not None}
    if "device" in message:
        found = _device_mismatch(theta, present)
        if found is not None:
            return found
    found = dtype_mismatch(theta, present)
    if found is not None:
        return found
    if "type" in message:
        found = _integer_inputs(message, theta, present)
        if found is not None:
            return found
    if re.search(r"target dtype|scalar type Long", message):
        return _float_labels(present)
    bounds = re.search(r"Target (-?\d+) is out of bounds", message)
    if bounds is not None:
        return _label_out_of_range(int(bounds.group(1)), present)
    if re.search(_INTEGER_TARGETS, message):
        return (
            "the loss takes floating-point targets (binary_cross_entropy, huber_loss, ...) but "
            "the batch holds integer ones; convert them with y.float()"
        )
    if call != "meta_backward_batch" and re.search(r"size|shape|dimension|elements", message):
        return _meta_batch(present, call)
    return None


class TaskChecks(NamedTuple):
    """What :func:`check_finite_tasks` found that is worth a warning rather than an error.

    Attributes:
        nonpositive_curvature: Tasks whose CG met non-positive curvature.
        diverged: Tasks whose relative stationarity exceeds :data:`DIVERGED_STATIONARITY`.
        worst_stationarity: The largest relative stationarity of those tasks (0 if none).
    """

    nonpositive_curvature: int
    diverged: int
    worst_stationarity: float


def check_finite_tasks(meta_grad: Params, tasks: TaskGradient, *, batched: bool) -> TaskChecks:
    """Refuse non-finite losses or meta-gradients, reading all flags in one host sync.

    The same sync reads the tasks' CG statuses and relative stationarities, for the warnings.

    Args:
        meta_grad: The meta-gradient about to be accumulated.
        tasks: The tasks' results (a leading task dimension when ``batched``).
        batched: Whether the message should name the tasks (``meta_backward_batch``).

    Returns:
        The counts of tasks whose CG met non-positive curvature and whose inner solve diverged
        (reported as warnings, since the meta-gradient is still finite there).

    Raises:
        ValueError: If the inner loss, the outer loss or the meta-gradient is not finite.
    """
    grad_finite = torch.stack([torch.isfinite(g).all() for g in meta_grad.values()]).all()
    inner_ok = torch.isfinite(tasks.inner_loss).reshape(-1)
    outer_ok = torch.isfinite(tasks.outer_loss).reshape(-1)
    status = tasks.cg.status.reshape(-1)
    relative = tasks.relative_stationarity.detach().reshape(-1)
    # float64 holds the flags and statuses exactly; one tensor, one transfer.
    flags = torch.cat(
        [
            t.to(torch.float64)
            for t in (grad_finite.reshape(1), inner_ok, outer_ok, status, relative)
        ]
    ).tolist()
    count = len(status)
    grad_ok = bool(flags[0])
    inner_flags, outer_flags = flags[1 : 1 + count], flags[1 + count : 1 + 2 * count]
    statuses = [int(st) for st in flags[1 + 2 * count : 1 + 3 * count]]
    relatives = flags[1 + 3 * count :]

    def which(bad: list[int]) -> str:
        return f" in tasks {bad}" if batched else ""

    bad_inner = [t for t, ok in enumerate(inner_flags) if not ok]
    if bad_inner:
        raise ValueError(
            f"the inner loss is not finite at the adapted parameters{which(bad_inner)}; the "
            "inner solver diverged or loss_fn produced NaN/inf on the support batch "
            "(try a smaller inner_lr)"
        )
    bad_outer = [t for t, ok in enumerate(outer_flags) if not ok]
    if bad_outer:
        raise ValueError(f"the outer loss is not finite on the query batch{which(bad_outer)}")
    bad_grad = [t for t, st in enumerate(statuses) if st == CGStatus.NONFINITE]
    if not grad_ok or bad_grad:
        raise ValueError(
            f"the meta-gradient is not finite{which(bad_grad)}: a Hessian-vector product "
            "produced NaN/inf"
        )
    diverged = [r for r in relatives if r > DIVERGED_STATIONARITY]
    return TaskChecks(
        nonpositive_curvature=statuses.count(int(CGStatus.NONPOSITIVE_CURVATURE)),
        diverged=len(diverged),
        worst_stationarity=max(diverged, default=0.0),
    )


def divergence_warning(checks: TaskChecks, count: int, solver: str | None, lr: float) -> str:
    """The warning for inner solves that ended farther from stationary than they started.

    Args:
        checks: What :func:`check_finite_tasks` found (``diverged > 0``).
        count: Tasks in the call.
        solver: The inner solver's name, if it has one.
        lr: The inner learning rate.

    Returns:
        The message, naming the setting to lower.

    Example:
        >>> divergence_warning(TaskChecks(0, 2, 274.0), 4, "adam", 50.0)[:50]
        'the inner solve moved away from its solution in 2 '
    """
    name = f"{solver!r} " if solver else ""
    return (
        f"the inner solve moved away from its solution in {checks.diverged} of {count} tasks: "
        f"relative_stationarity up to {checks.worst_stationarity:.3g} (above 1: the proximal "
        "gradient is larger at the adapted parameters than at theta), so the adapted "
        "parameters and the meta-gradient are unreliable; lower inner_lr (the "
        f"{name}inner solver runs at inner_lr={lr:g}) (shown once per optimizer; "
        "result.relative_stationarity has every task's value)"
    )


def curvature_warning(system: str, bad: int, count: int) -> str:
    """The warning for ``bad`` of ``count`` tasks whose adjoint system was not positive definite.

    Args:
        system: The adjoint system, as :meth:`ImplicitAdjoint.describe` words it.
        bad: Tasks where CG met non-positive curvature.
        count: Tasks in the call.

    Returns:
        The message, with the remedy.
    """
    return (
        f"the adjoint system {system} is not positive definite at the "
        f"adapted parameters in {bad} of {count} tasks; CG stopped early there "
        "and the meta-gradient is far from the solve. "
        + CURVATURE_REMEDY
        + " (shown once per optimizer; cg_status marks each affected task)"
    )


def step_warnings(
    checks: TaskChecks, count: int, system: str, solver: str | None, lr: float
) -> dict[str, str]:
    """The warnings a checked meta-step gives, by the key each is shown once under.

    Args:
        checks: What :func:`check_finite_tasks` found.
        count: Tasks in the call.
        system: The adjoint system in use, as :meth:`ImplicitAdjoint.describe` words it.
        solver: The inner solver's name, if it has one.
        lr: The inner learning rate.

    Returns:
        ``"curvature"`` (see :func:`curvature_warning`) and ``"diverged"`` (see
        :func:`divergence_warning`) where they apply.

    Example:
        >>> step_warnings(TaskChecks(0, 0, 0.0), 4, "first-order", "sgd", 0.1)
        {}
    """
    found: dict[str, str] = {}
    if checks.nonpositive_curvature:
        found["curvature"] = curvature_warning(system, checks.nonpositive_curvature, count)
    if checks.diverged:
        found["diverged"] = divergence_warning(checks, count, solver, lr)
    return found
