"""Building the model and the meta-optimizer a :class:`TrainConfig` describes."""

from __future__ import annotations

import torch
from torch import nn

from implicit_meta.fewshot.config import TrainConfig
from implicit_meta.models import create_backbone
from implicit_meta.optimizer import ImplicitMetaOptimizer

__all__ = ["build_lr_scheduler", "build_meta_optimizer", "build_model", "initial_model"]


def build_model(
    config: TrainConfig,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The backbone of ``config`` for images of ``image_shape``, float32 on ``device``.

    Initialisation draws from torch's global generator; seed it (``torch.manual_seed``) for a
    reproducible model.

    Args:
        config: Names the backbone and the number of ways (the output size).
        image_shape: ``(channels, height, width)`` of the input images.
        device: Where the parameters live.

    Returns:
        The model in train mode.

    Raises:
        ValueError: If the backbone spec is unknown.

    Example:
        >>> model = build_model(TrainConfig(backbone="conv4-16"), (1, 28, 28))
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """
    channels, height, _ = image_shape
    model = create_backbone(
        config.backbone, num_classes=config.ways, in_channels=channels, image_size=height
    )
    return model.to(device=torch.device(device), dtype=torch.float32).train()


def build_meta_optimizer(model: nn.Module, config: TrainConfig) -> ImplicitMetaOptimizer:
    """An :class:`~implicit_meta.ImplicitMetaOptimizer` with Adam and the settings of ``config``.

    Use it to adapt a meta-trained model to new tasks with
    :meth:`~implicit_meta.ImplicitMetaOptimizer.adapt`, with the inner solver, steps, learning
    rate and regularisation it was meta-trained with.

    Args:
        model: The model whose parameters are meta-learned.
        config: Inner problem (what adapts, ``reg``, the solver), adjoint (curvature,
            damping, CG) and meta-learning settings.

    Returns:
        The meta-optimizer (Adam over every parameter at ``config.meta_lr``).

    Raises:
        ValueError: If the inner solver name is not registered or its step diverges at
            ``reg``.

    Example:
        >>> config = TrainConfig(backbone="conv4-16")
        >>> meta = build_meta_optimizer(build_model(config, (1, 28, 28)), config)
        >>> meta.problem == config.inner_problem()
        True
    """
    outer = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    return ImplicitMetaOptimizer(
        model, outer, problem=config.inner_problem(), adjoint=config.adjoint()
    )


def initial_model(
    config: TrainConfig,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The untrained model a run of ``config`` starts from, rebuilt from ``config.seed``.

    It is the baseline every score is compared with: the same architecture and adaptation
    without meta-training. torch's global generator is saved and restored around the rebuild,
    so calling this never changes what a run draws afterwards.

    Args:
        config: Names the backbone, the ways and the seed.
        image_shape: ``(channels, height, width)`` of the input images.
        device: Where the parameters live.

    Returns:
        The model in train mode, with the parameters of a fresh run's first meta-step.

    Example:
        >>> config = TrainConfig(backbone="conv4-8")
        >>> a, b = initial_model(config, (1, 28, 28)), initial_model(config, (1, 28, 28))
        >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config, image_shape, device)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """The meta learning-rate schedule of ``config``, stepped once per meta-step.

    ``"cosine"`` is :class:`torch.optim.lr_scheduler.CosineAnnealingLR` over ``meta_steps``
    (to 0 after the last step), ``"constant"`` a :class:`~torch.optim.lr_scheduler.LambdaLR` of
    factor 1. Both are indexed by the meta-step alone and their state goes into checkpoints, so
    a resumed run continues the schedule exactly; it matches
    :func:`~implicit_meta.fewshot.config.meta_lr_at`.

    Args:
        optimizer: The outer optimizer, at ``config.meta_lr``.
        config: Supplies ``lr_schedule`` and ``meta_steps``.

    Returns:
        The scheduler; call its ``step()`` after every meta-step.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> schedule = build_lr_scheduler(adam, TrainConfig(meta_lr=1e-3, meta_steps=2))
        >>> adam.step(); schedule.step(); round(adam.param_groups[0]["lr"], 12)
        0.0005
    """
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, config.meta_steps), eta_min=0.0
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
