"""The leading task axis of a batch of tasks: its size, checks, one task's slice, vmap's in_dims."""

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


def check_task_dimension(support: Any, query: Any, count: int, num_tasks: int | None) -> None:
    """Refuse batches that are most likely one task's, with no task dimension.

    ``meta_backward_batch(loss_fn, (x, y), (xq, yq))`` with one task's ``x`` of shape
    ``[N, C, H, W]`` and ``y`` of shape ``[N]`` would run every sample as a task. Real batches of
    tasks keep a sample dimension after the task dimension on their tensors, so two patterns
    give the mistake away: a tensor with no dimension beyond the leading one (``y``: one label
    per "task"), or every tensor of both batches holding a single sample per task (``x`` and
    ``y`` of a regression task shaped ``[N, 1]``).

    Args:
        support: The support batch.
        query: The query batch.
        count: The size of the leading dimension (from :func:`task_count`).
        num_tasks: The number of tasks the caller stated, or ``None``; when given, it must equal
            ``count`` and the patterns above are accepted.

    Raises:
        ValueError: If ``num_tasks`` disagrees with ``count``, or a pattern above is found.
        TypeError: If ``num_tasks`` is not an integer.

    Example:
        >>> import torch
        >>> x, y = torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)
        >>> check_task_dimension((x, y), (x, y), 6, None)
        Traceback (most recent call last):
        ...
        ValueError: meta_backward_batch got batches that look like a single task's, ...
        >>> check_task_dimension((x, y), (x, y), 6, num_tasks=6)
    """
    if num_tasks is not None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
            raise TypeError(f"num_tasks must be an integer or None, got {num_tasks!r}")
        if num_tasks != count:
            raise ValueError(
                f"num_tasks={num_tasks}, but the batches' leading (task) dimension is {count}"
            )
        return
    leaves = [
        (what, leaf)
        for what, batch in (("support", support), ("query", query))
        for leaf in pytree.tree_leaves(batch)
        if isinstance(leaf, Tensor)
    ]
    flat = next(((what, leaf) for what, leaf in leaves if leaf.dim() == 1), None)
    if flat is not None:
        what, leaf = flat
        reason = (
            f"the {what} tensor of shape {tuple(leaf.shape)} would give each of {count} tasks a "
            "single number"
        )
    elif all(leaf.dim() >= 2 and leaf.shape[1] == 1 for _, leaf in leaves):
        what, leaf = leaves[0]
        reason = (
            f"every task would hold a single sample (the {what} tensor of shape "
            f"{tuple(leaf.shape)} gives each of {count} tasks one of shape {tuple(leaf.shape[1:])})"
        )
    else:
        return
    raise ValueError(
        "meta_backward_batch got batches that look like a single task's, without a task "
        f"dimension: {reason}. Batches of T tasks hold tensors shaped [T, N, ...] (xs "
        "[T, N, C, H, W] and ys [T, N], say; torch.stack one task's tensors to build them); "
        "for one task call meta_backward(loss_fn, support, query). If the leading dimension "
        f"is the task dimension, say so with num_tasks={count}."
    )


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


def first_task(support: Any, query: Any, num_tasks: int | None) -> tuple[int, tuple[Any, Any]]:
    """The number of tasks and the first task's batches, once the task dimension is checked.

    Args:
        support: Support batches, tensors shaped ``[T, ...]``.
        query: Query batches, tensors shaped ``[T, ...]``.
        num_tasks: The number of tasks the caller stated, or ``None``.

    Returns:
        ``(T, (support_0, query_0))``.

    Raises:
        ValueError: As :func:`task_count` and :func:`check_task_dimension`.

    Example:
        >>> import torch
        >>> count, (s0, _) = first_task((torch.zeros(3, 5, 2),), (torch.zeros(3, 4, 2),), None)
        >>> count, s0[0].shape
        (3, torch.Size([5, 2]))
    """
    count = task_count(support, query)
    check_task_dimension(support, query, count, num_tasks)
    return count, (select_task(support, 0), select_task(query, 0))
