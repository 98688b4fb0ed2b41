"""Run one meta_backward (or an unrolled control) and print the peak memory it added, in MiB.

Used by test_memory.py in a fresh subprocess per setting, so every peak is its own. On CUDA the
peak is torch.cuda.max_memory_allocated; on CPU the kernel's peak resident size (VmHWM, reset
just before the measured call) minus the resident size at that point.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident size since the last reset (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    mode, steps, device_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)
    ).to(device)
    x = torch.randn(1024, 64, device=device)
    y = torch.randint(0, 10, (1024,), device=device)

    def loss_fn(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(module(batch[0]), batch[1])

    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        inner="sgd",
        inner_steps=steps,
        inner_lr=0.1,
        cg_steps=5,
    )
    meta.meta_backward(loss_fn, (x, y), (x, y))  # warm-up: allocator pools, lazy init
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        # Without the reset, the process's peak could be an import-time spike (shared libraries
        # loading) rather than anything the measured call did.
        reset_peak_rss()
        start = rss_mib()
    if mode == "implicit":
        meta.meta_backward(loss_fn, (x, y), (x, y))
    else:  # control: MAML-style unrolled differentiation through the inner loop
        params = dict(model.named_parameters())
        for _ in range(steps):
            loss = torch.func.functional_call(model, params, (x,))
            grads = torch.autograd.grad(
                F.cross_entropy(loss, y), list(params.values()), create_graph=True
            )
            params = {k: v - 0.1 * g for (k, v), g in zip(params.items(), grads, strict=True)}
        F.cross_entropy(torch.func.functional_call(model, params, (x,)), y).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        peak = peak_rss_mib() - start
    print(f"{peak:.2f}")


if __name__ == "__main__":
    main()
