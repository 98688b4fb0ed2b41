"""Checks a run's settings must pass before it starts: against the library and the launch.

:class:`~implicit_meta.fewshot.config.TrainConfig` checks its settings when it is made
(the backbone and inner solver included) and
:func:`~implicit_meta.fewshot.config.check_resumable` compares two configs; these need more
than the config: the number of processes, or the model built for the dataset's images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from implicit_meta.distributed import check_meta_batch_divides
from implicit_meta.fewshot.config import TrainConfig

__all__ = ["check_model", "check_world_size"]


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


def check_model(
    model: nn.Module,
    config: TrainConfig,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
) -> None:
    """Raise unless ``model`` turns a support set of ``image_shape`` images into ``ways`` logits.

    One forward pass on a batch of ``ways * shots`` blank images, in eval mode and without
    gradients, so that it changes nothing (no BatchNorm statistics, no random draws) and a
    backbone that cannot take the dataset's images fails before the run folder is created,
    with one line instead of a traceback from inside meta-training.

    Args:
        model: The model built for the run (in train mode; left in the mode it was in).
        config: Names the backbone, the ways and the shots.
        image_shape: ``(channels, height, width)`` of the dataset's images.
        device: Where the model's parameters live.

    Raises:
        ValueError: If the forward pass fails or its output is not ``(ways * shots, ways)``.

    Example:
        >>> check_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 5)), TrainConfig(), (1, 2, 2))
        >>> check_model(nn.Sequential(nn.Flatten(), nn.Linear(9, 5)), TrainConfig(), (1, 2, 2))
        Traceback (most recent call last):
        ...
        ValueError: backbone 'conv4-32' cannot classify 1x2x2 images into 5 classes: ...
    """
    channels, height, width = image_shape
    images = torch.zeros((config.ways * config.shots, *image_shape), device=device)
    what = (
        f"backbone {config.backbone!r} cannot classify {channels}x{height}x{width} images "
        f"into {config.ways} classes"
    )
    training = model.training
    try:
        with torch.no_grad():
            outputs = model.eval()(images)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # whatever the model raises, the remedy is another backbone
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{what}: {reason} (choose a backbone for this image size; timm CNNs pool "
            "globally and take any size, and timm: models with a fixed size get img_size)"
        ) from error
    finally:
        model.train(training)
    expected = (images.shape[0], config.ways)
    if not isinstance(outputs, Tensor) or tuple(outputs.shape) != expected:
        got = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"{what}: its output on a support set of {expected[0]} images is {got}, not the "
            f"{expected} logits the few-shot loss needs"
        )
