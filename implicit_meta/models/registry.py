"""Backbones by name: ``"conv4"`` (width via ``"conv4-<width>"``) and any timm model."""

from __future__ import annotations

import re

from torch import nn

from implicit_meta.models.conv4 import Conv4

__all__ = ["TIMM_PREFIX", "build_backbone", "check_backbone", "list_backbones"]

TIMM_PREFIX = "timm:"
"""Prefix of a timm model spec, e.g. ``"timm:resnet10t"``."""

_CONV4 = re.compile(r"conv4(?:-(\d+))?")


def list_backbones() -> list[str]:
    """The backbone spec patterns :func:`build_backbone` accepts.

    Returns:
        ``["conv4", "conv4-<width>", "timm:<name>"]``; ``<name>`` is any name in
        ``timm.list_models()``.

    Example:
        >>> list_backbones()
        ['conv4', 'conv4-<width>', 'timm:<name>']
    """
    return ["conv4", "conv4-<width>", TIMM_PREFIX + "<name>"]


def check_backbone(spec: str) -> None:
    """Raise unless :func:`build_backbone` knows ``spec``, without building anything.

    Args:
        spec: ``"conv4"``, ``"conv4-<width>"`` or ``"timm:<name>"``.

    Raises:
        ValueError: If the spec is not recognised or timm does not know the model.

    Example:
        >>> check_backbone("conv4-32")
        >>> check_backbone("resnet")
        Traceback (most recent call last):
        ...
        ValueError: unknown backbone 'resnet'; expected one of conv4, conv4-<width>, timm:<name>
    """
    if _CONV4.fullmatch(spec) is not None:
        return
    if spec.startswith(TIMM_PREFIX):
        # Imported here: timm takes seconds to import and Conv4 users never need it.
        import timm

        name = spec[len(TIMM_PREFIX) :]
        if not name or not timm.is_model(name):
            raise ValueError(
                f"timm has no model {name!r}; see timm.list_models() for the available names"
            )
        return
    raise ValueError(f"unknown backbone {spec!r}; expected one of {', '.join(list_backbones())}")


def build_backbone(spec: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build a freshly initialised classifier from a spec string.

    ``"conv4"`` is the 64-channel :class:`~implicit_meta.models.Conv4` of MAML/iMAML and
    ``"conv4-<width>"`` the same with ``<width>`` channels. ``"timm:<name>"`` is
    ``timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)``
    for any timm model, unchanged; ``image_size`` is not passed to timm (most timm CNNs pool
    globally and accept any size; models with a fixed input size must be given images of it).

    BatchNorm: Conv4 normalises with batch statistics in every mode (no running statistics).
    timm models keep their ordinary BatchNorm; meta-training never writes its running statistics,
    so adapt and evaluate timm models in train mode (batch statistics), which is what
    :mod:`implicit_meta.fewshot` does.

    Args:
        spec: ``"conv4"``, ``"conv4-<width>"`` or ``"timm:<name>"``.
        num_classes: Output logits.
        in_channels: Input channels.
        image_size: Input height and width (used by Conv4 for its head size).

    Returns:
        The model, on the CPU in float32 and train mode.

    Raises:
        ValueError: If the spec is not recognised or timm does not know the model.

    Example:
        >>> model = build_backbone("conv4-32", num_classes=5, in_channels=1, image_size=28)
        >>> sum(p.numel() for p in model.parameters())
        28485
    """
    check_backbone(spec)
    match = _CONV4.fullmatch(spec)
    if match is not None:
        width = int(match.group(1)) if match.group(1) else 64
        return Conv4(num_classes, in_channels, width=width, image_size=image_size)
    import timm

    model: nn.Module = timm.create_model(
        spec[len(TIMM_PREFIX) :], pretrained=False, num_classes=num_classes, in_chans=in_channels
    )
    return model
