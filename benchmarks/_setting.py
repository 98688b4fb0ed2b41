"""The benchmark setting of the vmap issue, shared by the scripts in this folder.

20-way 1-shot Omniglot-shaped tasks (1x28x28 images, 5 query images per class), Conv4 (64
channels, BatchNorm), reg 2, inner SGD with lr 0.1, CG 5. Images are random: timings and memory
do not depend on pixel values, and the scripts then need no data set.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit_meta.models import Conv4

WAYS, SHOTS, QUERIES, IMAGE = 20, 1, 5, 28
REG, INNER_LR, CG_STEPS = 2.0, 0.1, 5


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return Conv4(in_channels=1, num_classes=WAYS, image_size=IMAGE).to(device)


def make_tasks(
    tasks: int, device: torch.device
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs = torch.rand(tasks, WAYS * SHOTS, 1, IMAGE, IMAGE, generator=g)
    xq = torch.rand(tasks, WAYS * QUERIES, 1, IMAGE, IMAGE, generator=g)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1).contiguous()
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1).contiguous()
    return (xs.to(device), ys.to(device)), (xq.to(device), yq.to(device))


def cross_entropy(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


def functional_loss(
    model: nn.Module, batch: tuple[Tensor, Tensor]
) -> Callable[[dict[str, Tensor]], Tensor]:
    """L(params) on a batch, buffers cloned inside (the peers get the same BatchNorm policy)."""
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(params: dict[str, Tensor]) -> Tensor:
        state: dict[str, Any] = dict(params)
        state.update({k: v.clone() for k, v in buffers.items()})
        return F.cross_entropy(torch.func.functional_call(model, state, (batch[0],)), batch[1])

    return loss


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so import-time spikes do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident size since the last reset (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
