"""Meta-training over several processes with ``torch.distributed``.

Each rank computes the implicit meta-gradients of its own share of the meta-batch; the
gradients are averaged across ranks with one ``all_reduce`` over a single flat buffer, and every
rank then takes the same outer step, so the parameters stay identical everywhere (the ranks start
from rank 0's parameters). This is what ``DistributedDataParallel`` does for ordinary training;
DDP itself does not fit here because its hooks fire on ``backward()``, and iMAML's gradients are
written by CG, not by autograd through the module.

Launch with ``torchrun --nproc_per_node=N ...``; use the ``nccl`` backend on GPUs and ``gloo`` on
CPUs (:func:`init_distributed` picks by device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from implicit_meta._device import resolve_device
from implicit_meta._task_axis import task_count

__all__ = [
    "DistributedContext",
    "all_gather_objects",
    "all_reduce_mean",
    "average_gradients",
    "broadcast_object",
    "broadcast_parameters",
    "check_meta_batch_divides",
    "init_distributed",
    "launch_rank",
    "launch_world_size",
    "shard_tasks",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a (possibly single-process) run.

    Attributes:
        rank: This process's rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
        device: The device this rank computes on.
        local_world_size: Number of processes on this machine (``torchrun``'s
            ``LOCAL_WORLD_SIZE``); CPU ranks share the machine's cores among this many.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group that ``torchrun`` describes, or run as a single process.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment (set by ``torchrun``).
    With a world size above one it initialises the default process group, ``nccl`` on CUDA and
    ``gloo`` on the CPU, and pins each rank to GPU ``LOCAL_RANK``.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Returns:
        The :class:`DistributedContext` of this process.

    Raises:
        ValueError: If ``device`` is not one of the three names (an explicit ``"cuda:<i>"``
            is refused too: each rank takes GPU ``LOCAL_RANK``).
        implicit_meta.fewshot.DeviceUnavailableError: If CUDA is requested but not available,
            or there are fewer GPUs than local ranks. A :class:`RuntimeError`, raised by the
            same resolver as :func:`implicit_meta.fewshot.device.resolve_device`, so the
            messages are the same.

    Example:
        >>> context = init_distributed("cpu")  # no torchrun: a single process
        >>> context.world_size, context.is_main
        (1, True)
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank=local_rank)
    use_cuda = torch_device.type == "cuda"
    world_size = launch_world_size()
    rank = launch_rank()
    # Without torchrun's LOCAL_WORLD_SIZE, assume every rank shares this machine: dividing its
    # cores among too many ranks only costs speed, too few oversubscribes them.
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, torch_device, local_world_size)


def launch_world_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 without torchrun).

    Readable before the process group exists, so settings that must divide across the ranks
    can be checked before any process waits for the others.

    Returns:
        At least 1.

    Raises:
        ValueError: If ``WORLD_SIZE`` is not a positive integer.

    Example:
        >>> import os
        >>> launch_world_size() if "WORLD_SIZE" not in os.environ else 1
        1
    """
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {value!r}")
    return int(value)


def launch_rank() -> int:
    """This process's rank as ``torchrun`` set it (``RANK``; 0 without torchrun).

    Returns:
        The rank; 0 is the process that writes files and prints.

    Example:
        >>> import os
        >>> launch_rank() if "RANK" not in os.environ else 0
        0
    """
    return int(os.environ.get("RANK", "0"))


def check_meta_batch_divides(
    meta_batch: int, world_size: int, *, setting: str = "meta-batch"
) -> None:
    """Raise unless ``meta_batch`` tasks split evenly across ``world_size`` processes.

    Each rank computes the meta-gradient of ``meta_batch / world_size`` tasks; averaging the
    ranks' gradients gives the task mean over the whole meta-batch only when every rank has as
    many tasks. Checked both before the process group exists (by the trainer, so every rank
    fails at once rather than waiting for the others) and when a batch is sharded.

    Args:
        meta_batch: Number of tasks in one meta-batch.
        world_size: Number of processes (``torchrun``'s ``WORLD_SIZE``).
        setting: How the message names the setting to change, e.g. ``"--meta-batch"`` for
            the command line.

    Raises:
        ValueError: If ``world_size`` is not positive or does not divide ``meta_batch``; the
            message suggests the next meta-batch that does.

    Example:
        >>> check_meta_batch_divides(4, 2)
        >>> check_meta_batch_divides(4, 3)
        Traceback (most recent call last):
        ...
        ValueError: the meta-batch of 4 tasks does not divide across 3 processes; ... e.g. 6
    """
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size}")
    if meta_batch % world_size:
        suggestion = -(-meta_batch // world_size) * world_size
        raise ValueError(
            f"the meta-batch of {meta_batch} tasks does not divide across {world_size} "
            f"processes; use a {setting} that is a multiple of {world_size}, e.g. {suggestion}"
        )


def shard_tasks(batch: Any, context: DistributedContext) -> Any:
    """This rank's contiguous share of a batch of tasks (leading dimension ``T``).

    Args:
        batch: A (nested) tuple, list or dict of tensors shaped ``[T, ...]``.
        context: The process's :class:`DistributedContext`.

    Returns:
        The same structure holding tasks ``rank * T/W`` to ``(rank + 1) * T/W``.

    Raises:
        ValueError: If ``T`` is not divisible by the world size.

    Example:
        >>> import torch
        >>> ctx = DistributedContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
        >>> shard_tasks((torch.arange(4), torch.arange(4)), ctx)[0]
        tensor([2, 3])
    """
    count = task_count(batch, batch)
    check_meta_batch_divides(count, context.world_size)
    share = count // context.world_size
    start = context.rank * share
    return torch.utils._pytree.tree_map(
        lambda x: x[start : start + share] if isinstance(x, torch.Tensor) else x, batch
    )


def broadcast_parameters(model: nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (a no-op for one process).

    Args:
        model: The model, the same architecture on every rank.
        context: The process's :class:`DistributedContext`.
    """
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(model: nn.Module, context: DistributedContext) -> None:
    """Average the trainable parameters' ``.grad`` across ranks, in one ``all_reduce``.

    Parameters without a gradient on this rank count as zero, so every rank ends with the same
    gradients whatever each computed.

    Args:
        model: The model whose trainable parameters' ``.grad`` hold this rank's meta-gradient
            (already averaged over this rank's tasks).
        context: The process's :class:`DistributedContext`.
    """
    if not context.enabled:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= context.world_size
    offset = 0
    for param in params:
        size = param.numel()
        param.grad = flat[offset : offset + size].view_as(param).clone()
        offset += size


def broadcast_object(obj: T, context: DistributedContext) -> T:
    """Rank 0's ``obj`` on every rank (pickled; returned unchanged for one process).

    For small, infrequent payloads: a decision, an exception, a loaded checkpoint.

    Args:
        obj: A picklable object; only rank 0's value matters.
        context: The process's :class:`DistributedContext`.

    Returns:
        Rank 0's object.

    Example:
        >>> ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
        >>> broadcast_object({"stop": True}, ctx)
        {'stop': True}
    """
    if not context.enabled:
        return obj
    payload: list[Any] = [obj]
    dist.broadcast_object_list(payload, src=0, device=_collective_device(context))
    return cast(T, payload[0])


def all_gather_objects(obj: T, context: DistributedContext) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (pickled).

    Args:
        obj: This rank's picklable object.
        context: The process's :class:`DistributedContext`.

    Returns:
        ``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` for one process.

    Example:
        >>> ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
        >>> all_gather_objects([0.5, 1.0], ctx)
        [[0.5, 1.0]]
    """
    if not context.enabled:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return cast(list[T], gathered)


def all_reduce_mean(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (a new tensor; ``tensor`` itself for one process).

    Args:
        tensor: Same shape and dtype on every rank, on ``context.device``.
        context: The process's :class:`DistributedContext`.

    Returns:
        The element-wise mean.

    Example:
        >>> ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
        >>> all_reduce_mean(torch.tensor([1.0, 3.0]), ctx)
        tensor([1., 3.])
    """
    if not context.enabled:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / context.world_size


def _collective_device(context: DistributedContext) -> torch.device | None:
    # nccl moves object payloads through the GPU; gloo through host memory.
    return context.device if context.device.type == "cuda" else None
