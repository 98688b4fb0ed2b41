"""Checks a run's settings must pass before it starts: against the library and the launch.

:class:`~implicit_meta.fewshot.config.TrainConfig` checks each field alone and
:func:`~implicit_meta.fewshot.config.check_resumable` compares two configs; these need more
than the config: the registered backbones and inner solvers, or the number of processes.
"""

from __future__ import annotations

from torch import nn

from implicit_meta.distributed import check_meta_batch_divides
from implicit_meta.fewshot.builders import build_meta_optimizer
from implicit_meta.fewshot.config import TrainConfig
from implicit_meta.models.registry import check_backbone

__all__ = ["check_config", "check_world_size"]


def check_config(config: TrainConfig) -> None:
    """Raise if ``config`` cannot train, before any data is loaded or any file written.

    :class:`TrainConfig` checks each field alone; this checks what needs the library: that the
    backbone and the inner solver exist, that the inner options suit the solver, and that the
    inner step is stable at ``reg``. It builds the meta-optimizer of a one-parameter model, so
    it costs nothing.

    Args:
        config: The run settings.

    Raises:
        ValueError: Naming the setting that fails and why.

    Example:
        >>> check_config(TrainConfig())
        >>> check_config(TrainConfig(inner="sdg"))
        Traceback (most recent call last):
        ...
        ValueError: ...sdg...
    """
    check_backbone(config.backbone)
    build_meta_optimizer(nn.Linear(1, 1), config)


def check_world_size(config: TrainConfig, world_size: int) -> None:
    """Raise unless the meta-batch divides evenly across ``world_size`` processes.

    Each rank computes the meta-gradient of ``meta_batch / world_size`` tasks; averaging the
    ranks' gradients gives the task mean over the whole meta-batch only when every rank has as
    many tasks.

    Args:
        config: The run settings.
        world_size: Number of processes (``torchrun``'s ``WORLD_SIZE``).

    Raises:
        ValueError: If ``config.meta_batch`` is not a multiple of ``world_size``.

    Example:
        >>> check_world_size(TrainConfig(meta_batch=4), 2)
        >>> check_world_size(TrainConfig(meta_batch=4), 3)
        Traceback (most recent call last):
        ...
        ValueError: the meta-batch of 4 tasks does not divide across 3 processes; ... e.g. 6
    """
    check_meta_batch_divides(config.meta_batch, world_size, setting="--meta-batch")
