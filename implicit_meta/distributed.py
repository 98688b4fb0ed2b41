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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from implicit_meta._batch import task_count


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a (possibly single-process) run.

    Attributes:
        rank: This process's rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
        device: The device this rank computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

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
        ValueError: If ``device`` is not one of the three names.
        RuntimeError: If CUDA is requested but not available, or there are fewer GPUs than
            local ranks.

    Example:
        >>> context = init_distributed("cpu")  # no torchrun: a single process
        >>> context.world_size, context.is_main
        (1, True)
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} needs GPU {local_rank}, but only "
                f"{torch.cuda.device_count()} are visible"
            )
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, torch_device)


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
    if count % context.world_size:
        raise ValueError(
            f"the meta-batch of {count} tasks does not divide across {context.world_size} "
            "ranks; choose a meta-batch that is a multiple of the number of processes"
        )
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
