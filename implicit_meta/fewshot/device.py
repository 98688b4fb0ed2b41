"""Turning ``--device`` and ``--threads`` into a ``torch.device`` and a thread count."""

from __future__ import annotations

import os

import torch

# The resolver lives in the core package, which the distributed launch uses too; it is
# re-exported here, where the few-shot code and its users have always found it.
from implicit_meta._device import DeviceUnavailableError as DeviceUnavailableError
from implicit_meta._device import resolve_device as resolve_device

__all__ = [
    "DeviceUnavailableError",
    "available_cpus",
    "busy_cpus",
    "configure_threads",
    "resolve_device",
]


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one).

    Returns:
        At least 1.

    Example:
        >>> available_cpus() >= 1
        True
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def busy_cpus() -> int:
    """Cores kept busy by other processes: the 1-minute load average, rounded (0 if unknown).

    Returns:
        A non-negative integer.

    Example:
        >>> busy_cpus() >= 0
        True
    """
    try:
        return max(0, round(os.getloadavg()[0]))
    except (AttributeError, OSError):  # no load average on Windows
        return 0


def configure_threads(threads: int = 0) -> int:
    """Set torch's intra-op thread count; ``0`` picks one thread per core this process may use.

    The count can change the arithmetic (how reductions are split), so it must not depend on
    anything that varies between two runs of the same command: ``0`` means
    :func:`available_cpus`, the process's affinity mask, never the machine's load. On a shared
    machine that can oversubscribe the cores: every operator ends at a barrier that waits for
    all its threads, and a thread descheduled by another process stalls each small operator
    for a scheduler time slice. Pass an explicit ``threads`` (``--threads 1``) when other
    processes keep cores busy; :func:`busy_cpus` tells how many do.

    Args:
        threads: Thread count, or 0 for :func:`available_cpus`.

    Returns:
        The thread count set.

    Raises:
        ValueError: If ``threads`` is negative.

    Example:
        >>> current = torch.get_num_threads()
        >>> configure_threads(current) == current
        True
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    count = threads or available_cpus()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
