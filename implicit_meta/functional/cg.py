"""Conjugate gradient on parameter dicts, without a host sync per iteration.

CG runs a fixed number of iterations; once it has converged or met non-positive curvature, the
remaining iterations are masked out with ``torch.where`` instead of a Python ``break``. That keeps
the GPU queue full and lets the same code run under ``torch.func.vmap`` (one CG per task, each
with its own stopping point).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from implicit_meta.functional.tree import (
    Params,
    tree_axpy,
    tree_dot,
    tree_where,
    tree_zeros_like,
)


class CGStatus(enum.IntEnum):
    """Why conjugate gradient stopped; stored as an integer tensor in results.

    Attributes:
        CONVERGED: The residual norm fell to ``tol * ||b||`` or below.
        MAX_STEPS: The iteration budget ran out first (normal for iMAML's few CG steps).
        NONPOSITIVE_CURVATURE: A direction ``p`` with ``p^T A p <= 0`` was met, so ``A`` is not
            positive definite there; the last good iterate is returned.
        NONFINITE: A NaN or infinity appeared in ``A p``; the solution is not usable.
        FIRST_ORDER: No solve was run: the first-order adjoint (``cg_steps=0``) takes ``A = I``,
            so the meta-gradient is the right-hand side itself. CG never returns it.
    """

    CONVERGED = 0
    MAX_STEPS = 1
    NONPOSITIVE_CURVATURE = 2
    NONFINITE = 3
    FIRST_ORDER = 4


class CGResult(NamedTuple):
    """What conjugate gradient returns.

    Attributes:
        solution: Approximate solution ``x`` of ``A x = b``, a dict shaped like ``b``.
        residual_norm: ``||b - A x||`` as a 0-dim tensor (tracked by the recurrence).
        iterations: Number of iterations that updated ``x``, as a 0-dim int64 tensor.
        status: A :class:`CGStatus` value as a 0-dim int64 tensor.
    """

    solution: Params
    residual_norm: Tensor
    iterations: Tensor
    status: Tensor


def conjugate_gradient(
    matvec: Callable[[Params], Params],
    b: Params,
    *,
    max_steps: int,
    tol: float | Tensor = 1e-10,
) -> CGResult:
    """Solve ``A x = b`` for a symmetric ``A`` given as ``matvec``, starting from ``x = 0``.

    This is CG on ``A`` itself (not on the normal equations ``A^T A``), which needs ``A`` to be
    positive definite. When a search direction has non-positive curvature, CG stops there, as
    truncated-CG (Steihaug) methods do, and returns the last good iterate; if that happens on the
    very first direction the iterate is still zero and ``b`` itself is returned instead (the
    steepest-descent choice of Newton-CG, and the first-order approximation in iMAML, where
    ``A = I + H/reg`` and ``b`` is the outer gradient). The status says which case occurred.

    Args:
        matvec: Function computing ``A v`` for a dict ``v`` shaped like ``b``.
        b: Right-hand side.
        max_steps: Number of iterations (each costs one ``matvec``); must be at least 1.
        tol: Relative tolerance: converged when ``||r|| <= tol * ||b||``; a 0-dim tensor is
            accepted too (Newton-CG's forcing sequence), and is not checked on the host.

    Returns:
        A :class:`CGResult`.

    Raises:
        ValueError: If ``max_steps < 1`` or ``tol < 0``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> out = conjugate_gradient(lambda v: {"x": A @ v["x"]}, {"x": torch.tensor([1.0, 2.0])},
        ...                          max_steps=2)
        >>> torch.allclose(A @ out.solution["x"], torch.tensor([1.0, 2.0]))
        True
        >>> CGStatus(int(out.status))
        <CGStatus.CONVERGED: 0>
    """
    if max_steps < 1:
        raise ValueError(f"CG max_steps must be at least 1, got {max_steps}")
    if isinstance(tol, float | int) and tol < 0:
        raise ValueError(f"CG tol must be non-negative, got {tol}")

    x = tree_zeros_like(b)
    r = dict(b)
    p = dict(b)
    rs = tree_dot(r, r)
    b_norm = torch.sqrt(rs)
    threshold = tol * b_norm
    device = rs.device
    status = torch.full((), int(CGStatus.MAX_STEPS), dtype=torch.int64, device=device)
    # A zero right-hand side is solved by x = 0 before any iteration.
    done = b_norm <= threshold
    status = torch.where(done, torch.full_like(status, int(CGStatus.CONVERGED)), status)
    iterations = torch.zeros((), dtype=torch.int64, device=device)
    tiny = torch.finfo(rs.dtype).tiny

    for step in range(max_steps):
        ap = matvec(p)
        curvature = tree_dot(p, ap)
        nonfinite = ~torch.isfinite(curvature)
        # Relative test: p^T A p <= 0 up to rounding is treated as non-positive curvature.
        nonpositive = curvature <= 0
        active = ~done & ~nonfinite & ~nonpositive
        alpha = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rs_new = tree_dot(r, r)
        converged = active & (torch.sqrt(rs_new) <= threshold)

        if step == 0:
            # Non-positive curvature on the first direction: x is still zero, return b instead;
            # its residual b - A b is at hand because p = b here.
            first_bad = ~done & nonpositive & ~nonfinite
            x = tree_where(first_bad, b, x)
            r_of_b = tree_axpy(-1.0, ap, b)
            rs = torch.where(first_bad, tree_dot(r_of_b, r_of_b), rs)
        newly_bad = ~done & nonpositive & ~nonfinite
        newly_nonfinite = ~done & nonfinite
        status = torch.where(
            newly_nonfinite, torch.full_like(status, int(CGStatus.NONFINITE)), status
        )
        status = torch.where(
            newly_bad, torch.full_like(status, int(CGStatus.NONPOSITIVE_CURVATURE)), status
        )
        status = torch.where(converged, torch.full_like(status, int(CGStatus.CONVERGED)), status)
        iterations = iterations + active.to(torch.int64)

        beta = torch.where(active, rs_new / torch.clamp(rs, min=tiny), 0.0)
        p = tree_where(active, tree_axpy(beta, p, r), p)
        rs = torch.where(active, rs_new, rs)
        done = done | converged | nonpositive | nonfinite

    residual_norm = torch.sqrt(rs)
    return CGResult(solution=x, residual_norm=residual_norm, iterations=iterations, status=status)
