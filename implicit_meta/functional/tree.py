"""Arithmetic on parameter dicts (name -> tensor), the pytree every solver works on.

Kept tiny and free of host syncs so that everything built on it runs under ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]
"""Parameters as a dict of tensors, the functional representation of a model."""


def tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Inner product ``sum_k <a[k], b[k]>`` as a 0-dim tensor."""
    terms = [torch.sum(a[k] * b[k]) for k in a]
    return torch.stack(terms).sum()


def tree_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of all entries of ``a`` together, as a 0-dim tensor."""
    return torch.sqrt(tree_dot(a, a))


def tree_axpy(alpha: Tensor | float, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Params:
    """``alpha * x + y`` entry by entry."""
    return {k: alpha * x[k] + y[k] for k in y}


def tree_scale(alpha: Tensor | float, x: Mapping[str, Tensor]) -> Params:
    """``alpha * x`` entry by entry."""
    return {k: alpha * v for k, v in x.items()}


def tree_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    """``a - b`` entry by entry."""
    return {k: a[k] - b[k] for k in a}


def tree_where(cond: Tensor, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    """Pick ``a`` where the 0-dim boolean ``cond`` holds, else ``b`` (no host sync)."""
    return {k: torch.where(cond, a[k], b[k]) for k in a}


def tree_zeros_like(a: Mapping[str, Tensor]) -> Params:
    """Zeros shaped like ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}
