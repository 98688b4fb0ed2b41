"""How ``meta_backward_batch`` runs its tasks: vectorised with ``torch.func.vmap``, or in a loop.

Both take one task's function ``one_task(support, query, buffers, theta)`` and return the tasks'
results stacked on a leading task dimension, so the caller cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from implicit_meta._task_axis import select_task, task_in_dims
from implicit_meta.functional.implicit import TaskGradient
from implicit_meta.functional.tree import Params
from implicit_meta.solvers.registry import vmap_unsupported_reason

TaskFn = Callable[[Any, Any, Params, Params], TaskGradient]
"""One task's meta-gradient: ``one_task(support, query, buffers, theta)``."""


def auto_strategy(solver: Callable[..., Params], device: torch.device) -> str:
    """What ``strategy="auto"`` means for ``solver`` with parameters on ``device``.

    On the CPU one task's convolutions already use every core, so vmap gains nothing per inner
    step and costs more up front and in memory; on CUDA one kernel for all tasks keeps the
    device busy. A solver known not to be vmappable loops without trying (and warning).

    Args:
        solver: The inner solver.
        device: The device of the meta-parameters.

    Returns:
        ``"vmap"`` or ``"loop"``.
    """
    if vmap_unsupported_reason(solver):
        return "loop"
    return "vmap" if device.type == "cuda" else "loop"


def vmap_over_tasks(
    one_task: TaskFn, support: Any, query: Any, theta: Params, buffers: Params, count: int
) -> TaskGradient:
    """Run ``one_task`` on all ``count`` tasks at once under ``torch.func.vmap``.

    Args:
        one_task: One task's function.
        support: Support batches, tensors shaped ``[T, ...]``.
        query: Query batches, tensors shaped ``[T, ...]``.
        theta: The meta-parameters (one copy, without a task dimension).
        buffers: The model's buffers (one copy).
        count: The number of tasks ``T``.

    Returns:
        The tasks' results, each with a leading task dimension.
    """
    # One copy of theta and of the buffers per task. Buffers: BatchNorm's in-place
    # running-statistics update then happens on batched tensors, which vmap allows, and is
    # thrown away with them. Theta: solvers whose state starts as zeros_like(params) and is
    # updated in place (torchopt's Adam moments) need a batched start.
    task_theta = {k: v.unsqueeze(0).expand(count, *v.shape).clone() for k, v in theta.items()}
    task_buffers = {k: v.unsqueeze(0).expand(count, *v.shape).clone() for k, v in buffers.items()}
    # hvp="auto" switches to forward-over-reverse under vmap (see functional.make_hvp).
    batched = torch.func.vmap(
        one_task,
        in_dims=(task_in_dims(support), task_in_dims(query), 0, 0),
        randomness="error",
    )
    result: TaskGradient = batched(support, query, task_buffers, task_theta)
    return result


def loop_over_tasks(
    one_task: TaskFn, support: Any, query: Any, theta: Params, buffers: Params, count: int
) -> TaskGradient:
    """Run ``one_task`` on the ``count`` tasks one after the other and stack the results.

    Args:
        one_task: One task's function.
        support: Support batches, tensors shaped ``[T, ...]``.
        query: Query batches, tensors shaped ``[T, ...]``.
        theta: The meta-parameters.
        buffers: The model's buffers.
        count: The number of tasks ``T``.

    Returns:
        The tasks' results, each with a leading task dimension.
    """
    tasks = [
        one_task(select_task(support, t), select_task(query, t), buffers, theta)
        for t in range(count)
    ]
    stacked: TaskGradient = pytree.tree_map(lambda *xs: torch.stack(xs), *tasks)
    return stacked
