"""Turning a device name (``"auto"``, ``"cpu"``, ``"cuda"``) into a ``torch.device``.

One resolver serves both the single-process few-shot code (:mod:`implicit_meta.fewshot`) and
the ranks of a ``torchrun`` launch (:func:`implicit_meta.distributed.init_distributed`), so a
missing GPU is reported the same way, with the same error type, whichever path asked for it.
"""

from __future__ import annotations

import re

import torch

__all__ = ["DeviceUnavailableError", "resolve_device"]

_NAMES = "'auto', 'cpu' or 'cuda'"


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine; the message says why.

    A :class:`RuntimeError`, so code that caught the plain error still catches this one.

    Example:
        >>> issubclass(DeviceUnavailableError, RuntimeError)
        True
    """


def resolve_device(spec: str, *, local_rank: int | None = None) -> torch.device:
    """The device for ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"cuda:<i>"`` also accepted).

    Args:
        spec: ``"auto"`` picks CUDA when ``torch.cuda.is_available()``, else the CPU.
        local_rank: For a rank of a multi-process launch, its rank on this machine: CUDA then
            means GPU ``local_rank``, and an explicit ``"cuda:<i>"`` is refused because it would
            put every rank on the same GPU. ``None`` for a single process.

    Returns:
        The device: ``cuda`` without an index for a single process, ``cuda:<local_rank>`` for
        a rank.

    Raises:
        DeviceUnavailableError: If CUDA is requested but not available (the message names the
            installed torch build, so a CPU-only wheel is easy to recognise), or the GPU it
            names is not visible.
        ValueError: If ``spec`` is not a known device.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("cpu", local_rank=1)
        device(type='cpu')
    """
    indexed = re.fullmatch(r"cuda:\d+", spec) is not None
    if indexed and local_rank is not None:
        raise ValueError(
            f"device {spec!r} names one GPU, but each process uses GPU LOCAL_RANK; "
            f"device must be {_NAMES}"
        )
    if spec not in ("auto", "cpu", "cuda") and not indexed:
        raise ValueError(f"unknown device {spec!r}; device must be {_NAMES} (or 'cuda:<index>')")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = torch.version.cuda or "CPU-only"
        raise DeviceUnavailableError(
            f"--device {spec} was requested but CUDA is not available "
            f"(torch {torch.__version__}, CUDA build: {build}); "
            "use --device cpu or --device auto"
        )
    if local_rank is not None:
        device = torch.device("cuda", local_rank)
        needed = f"local rank {local_rank} needs GPU {local_rank},"
    else:
        device = torch.device("cuda" if spec == "auto" else spec)
        needed = f"--device {spec} was requested"
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"{needed} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device
