"""What a meta-step reports when it goes wrong: non-finite results, indefinite curvature, dtypes.

The meta-optimizer calls these after the tasks are solved and before anything is written into
``p.grad``, so a failed check leaves the model and its gradients as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from implicit_meta._module import dtype_mismatch
from implicit_meta.functional._tree import Params
from implicit_meta.functional.cg import CGStatus
from implicit_meta.functional.implicit import TaskGradient

CURVATURE_REMEDY = (
    "Remedy: the positive semidefinite Gauss-Newton curvature: state the inner loss as "
    "im.output_loss(F.cross_entropy) (curvature='auto' then picks it), or "
    "adjoint=ImplicitAdjoint(curvature='gauss_newton'), or the first-order meta-gradient "
    "(the default, cg_steps=0), which trained as well or better in the adjoint study; a larger "
    "reg does not "
    "help on ReLU networks (docs: Benchmarks, adjoint study)"
)
"""The fix suggested when CG meets non-positive curvature (the study is on the Benchmarks page)."""


@contextlib.contextmanager
def naming_dtype_errors(theta: Params, support: Any, query: Any) -> Iterator[None]:
    """Turn torch's error for a model and batch of different dtypes into one that says so.

    Nothing is checked up front (a model may cast its inputs itself): only when the call fails
    are the dtypes compared, so this costs nothing on the way.

    Args:
        theta: The model's trainable parameters.
        support: The support batch (or one task's).
        query: The query batch, or ``None``.

    Yields:
        Nothing; a ``RuntimeError`` raised inside becomes a ``ValueError`` naming the dtypes
        when they differ, and is re-raised unchanged otherwise.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        problem = dtype_mismatch(theta, {"support": support, "query": query})
        if problem is None:
            raise
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{problem} (torch: {first_line})") from error


def check_finite_tasks(meta_grad: Params, tasks: TaskGradient, *, batched: bool) -> int:
    """Refuse non-finite losses or meta-gradients, reading all flags in one host sync.

    Args:
        meta_grad: The meta-gradient about to be accumulated.
        tasks: The tasks' results (a leading task dimension when ``batched``).
        batched: Whether the message should name the tasks (``meta_backward_batch``).

    Returns:
        The number of tasks whose CG met non-positive curvature (reported as a warning, since
        the meta-gradient is still finite there).

    Raises:
        ValueError: If the inner loss, the outer loss or the meta-gradient is not finite.
    """
    grad_finite = torch.stack([torch.isfinite(g).all() for g in meta_grad.values()]).all()
    inner_ok = torch.isfinite(tasks.inner_loss).reshape(-1)
    outer_ok = torch.isfinite(tasks.outer_loss).reshape(-1)
    status = tasks.cg.status.reshape(-1).to(torch.int64)
    flags = torch.cat(
        [
            grad_finite.reshape(1).to(torch.int64),
            inner_ok.to(torch.int64),
            outer_ok.to(torch.int64),
            status,
        ]
    ).tolist()
    count = len(status)
    grad_ok = bool(flags[0])
    inner_flags, outer_flags = flags[1 : 1 + count], flags[1 + count : 1 + 2 * count]
    statuses = flags[1 + 2 * count :]

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
    return statuses.count(int(CGStatus.NONPOSITIVE_CURVATURE))


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
