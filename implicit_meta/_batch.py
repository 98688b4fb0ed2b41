"""Helpers for batches of tasks: a leading task dimension on every tensor of a batch."""

from __future__ import annotations

from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor


def task_count(support: Any, query: Any) -> int:
    """The size ``T`` of the leading task dimension shared by every tensor of both batches.

    Args:
        support: Support batch whose tensors are shaped ``[T, ...]``.
        query: Query batch whose tensors are shaped ``[T, ...]``.

    Returns:
        ``T``.

    Raises:
        ValueError: If there is no tensor, a tensor has no task dimension, the sizes disagree or
            ``T`` is zero.
    """
    sizes: dict[int, str] = {}
    for what, batch in (("support", support), ("query", query)):
        leaves = [x for x in pytree.tree_leaves(batch) if isinstance(x, Tensor)]
        if not leaves:
            raise ValueError(f"the {what} batch holds no tensor with a leading task dimension")
        for leaf in leaves:
            if leaf.dim() == 0:
                raise ValueError(
                    f"the {what} batch holds a 0-dim tensor; batched tasks need a leading "
                    "task dimension on every tensor"
                )
            sizes.setdefault(int(leaf.shape[0]), f"{what} tensor of shape {tuple(leaf.shape)}")
    if len(sizes) > 1:
        found = "; ".join(f"{n} ({where})" for n, where in sizes.items())
        raise ValueError(f"support and query tensors disagree on the number of tasks: {found}")
    (count,) = sizes
    if count == 0:
        raise ValueError("the batch holds zero tasks (leading dimension 0)")
    return count


def select_task(batch: Any, index: int) -> Any:
    """Task ``index`` of a batch: every tensor indexed on its leading dimension.

    Args:
        batch: A (nested) tuple, list or dict of tensors shaped ``[T, ...]``.
        index: Task index.

    Returns:
        The same structure with the task dimension removed.
    """
    return pytree.tree_map(lambda x: x[index] if isinstance(x, Tensor) else x, batch)


def task_in_dims(batch: Any) -> Any:
    """``in_dims`` for ``torch.func.vmap``: 0 for tensors, ``None`` for anything else.

    Args:
        batch: A (nested) tuple, list or dict.

    Returns:
        A structure like ``batch`` with 0 or ``None`` leaves.
    """
    return pytree.tree_map(lambda x: 0 if isinstance(x, Tensor) else None, batch)
