"""The backbone registry: ``"conv4"``, ``"conv4-<width>"``, any timm model, and your own.

A backbone is a function ``build(*, num_classes, in_channels, image_size, **options)``
returning a freshly initialised ``nn.Module`` classifier. :func:`register_backbone` records
one under a name, the way timm's ``register_model`` does; :func:`build_backbone` builds any
registered backbone from a spec string, so a user's own network is one decorator away from
``TrainConfig(backbone="my_net")`` and ``implicit-meta train --backbone my_net``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from torch import nn

from implicit_meta.models.conv4 import Conv4

__all__ = [
    "TIMM_PREFIX",
    "BackboneBuilder",
    "build_backbone",
    "check_backbone",
    "list_backbones",
    "register_backbone",
    "unregister_backbone",
]

TIMM_PREFIX = "timm:"
"""Prefix of a timm model spec, e.g. ``"timm:resnet10t"``."""

_WIDTH_SUFFIX = re.compile(r"(?P<name>.+)-(?P<width>\d+)")


class BackboneBuilder(Protocol):
    """What :func:`register_backbone` accepts: a keyword-only builder of a fresh model."""

    def __call__(self, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        """Build the model.

        Args:
            num_classes: Output logits.
            in_channels: Input channels.
            image_size: Input height and width.

        Returns:
            A freshly initialised model.
        """
        ...


BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]
    takes_width: bool


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str, *, takes_width: bool = False, overwrite: bool = False
) -> Callable[[BuilderT], BuilderT]:
    """Register a backbone builder under ``name``; the function is returned unchanged.

    Args:
        name: The spec that builds it (no ``":"``, which marks external libraries such as
            ``timm:``).
        takes_width: The builder takes a ``width`` keyword, given as ``"<name>-<width>"``
            (as ``"conv4-32"``); ``"<name>"`` alone then uses the builder's default width.
        overwrite: Replace an existing registration of the same name instead of raising.

    Returns:
        A decorator that records the builder and returns it as it was.

    Raises:
        ValueError: If ``name`` is empty, contains ``":"`` or is taken (and ``overwrite`` is
            false).
        TypeError: If the decorated object is not callable.

    Example:
        >>> import torch
        >>> @register_backbone("linear_doc_example")
        ... def linear(*, num_classes, in_channels, image_size):
        ...     return torch.nn.Sequential(
        ...         torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, num_classes))
        >>> build_backbone("linear_doc_example", num_classes=5, in_channels=1, image_size=28)[1]
        Linear(in_features=784, out_features=5, bias=True)
        >>> unregister_backbone("linear_doc_example")
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"backbone name must be a non-empty string without ':', got {name!r}")

    def register(build: BuilderT) -> BuilderT:
        if not callable(build):
            raise TypeError(f"backbone {name!r} must be callable, got {type(build).__name__}")
        known = _REGISTRY.get(name)
        if known is not None and not overwrite and known.build is not build:
            raise ValueError(
                f"a backbone named {name!r} is already registered; pass overwrite=True to "
                "replace it"
            )
        _REGISTRY[name] = _Entry(build, takes_width)
        return build

    return register


def unregister_backbone(name: str) -> None:
    """Remove a registered backbone.

    Args:
        name: Registered name.

    Raises:
        KeyError: If nothing is registered under ``name``.

    Example:
        >>> register_backbone("tmp_doc_backbone")(lambda **sizes: None)
        <function <lambda> at ...>
        >>> unregister_backbone("tmp_doc_backbone")
    """
    if name not in _REGISTRY:
        raise KeyError(f"no backbone named {name!r} is registered")
    del _REGISTRY[name]


@register_backbone("conv4", takes_width=True)
def conv4(*, num_classes: int, in_channels: int, image_size: int, width: int = 64) -> Conv4:
    """The :class:`~implicit_meta.models.Conv4` of MAML/iMAML (64 channels unless ``width``).

    Args:
        num_classes: Output logits.
        in_channels: Input channels.
        image_size: Input height and width (for the head's size).
        width: Channels of every block (``"conv4-<width>"``).

    Returns:
        A fresh Conv4.

    Example:
        >>> conv4(num_classes=5, in_channels=1, image_size=28, width=8).head.in_features
        8
    """
    return Conv4(num_classes, in_channels, width=width, image_size=image_size)


def list_backbones() -> list[str]:
    """The backbone specs :func:`build_backbone` accepts, registered ones included.

    Returns:
        Each registered name (with ``"<name>-<width>"`` beside it where the builder takes a
        width), then ``"timm:<name>"``, where ``<name>`` is any name in ``timm.list_models()``.

    Example:
        >>> list_backbones()
        ['conv4', 'conv4-<width>', 'timm:<name>']
    """
    specs: list[str] = []
    for name, entry in _REGISTRY.items():
        specs += [name, f"{name}-<width>"] if entry.takes_width else [name]
    return [*specs, TIMM_PREFIX + "<name>"]


def _lookup(spec: str) -> tuple[_Entry, dict[str, int]] | None:
    """The registered entry ``spec`` names, with its width option; None if there is none."""
    if spec in _REGISTRY:
        return _REGISTRY[spec], {}
    match = _WIDTH_SUFFIX.fullmatch(spec)
    if match is not None:
        entry = _REGISTRY.get(match["name"])
        if entry is not None and entry.takes_width:
            return entry, {"width": int(match["width"])}
    return None


def check_backbone(spec: str) -> None:
    """Raise unless :func:`build_backbone` knows ``spec``, without building anything.

    Args:
        spec: A registered name (``"conv4"``), ``"<name>-<width>"`` or ``"timm:<name>"``.

    Raises:
        ValueError: If the spec is not recognised or timm does not know the model.

    Example:
        >>> check_backbone("conv4-32")
        >>> check_backbone("resnet")
        Traceback (most recent call last):
        ...
        ValueError: unknown backbone 'resnet'; expected one of conv4, conv4-<width>, timm:<name> ...
    """
    if _lookup(spec) is not None:
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
    raise ValueError(
        f"unknown backbone {spec!r}; expected one of {', '.join(list_backbones())} "
        "(register your own with implicit_meta.models.register_backbone)"
    )


def build_backbone(spec: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build a freshly initialised classifier from a spec string.

    ``"conv4"`` is the 64-channel :class:`~implicit_meta.models.Conv4` of MAML/iMAML and
    ``"conv4-<width>"`` the same with ``<width>`` channels; any name registered with
    :func:`register_backbone` builds with its builder. ``"timm:<name>"`` is
    ``timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)``
    for any timm model, with ``img_size=image_size`` added for the models whose configuration
    marks a fixed input size (ViTs, Swin, MLP-Mixer: their patch grid and position embeddings
    are sized for it); timm CNNs pool globally and take any size, so they are built without it.

    BatchNorm: Conv4 normalises with batch statistics in every mode (no running statistics).
    timm models keep their ordinary BatchNorm; meta-training never writes its running statistics,
    so adapt and evaluate timm models in train mode (batch statistics), which is what
    :mod:`implicit_meta.fewshot` does.

    Args:
        spec: A registered name, ``"<name>-<width>"`` or ``"timm:<name>"``.
        num_classes: Output logits.
        in_channels: Input channels.
        image_size: Input height and width (used by Conv4 for its head size).

    Returns:
        The model, as its builder returns it (Conv4 and timm: on the CPU in float32 and train
        mode).

    Raises:
        ValueError: If the spec is not recognised, timm does not know the model, or a timm
            model with a fixed input size does not take ``img_size``.
        TypeError: If a registered builder does not return an ``nn.Module``.

    Example:
        >>> model = build_backbone("conv4-32", num_classes=5, in_channels=1, image_size=28)
        >>> sum(p.numel() for p in model.parameters())
        28485
        >>> vit = build_backbone("timm:vit_tiny_patch16_224", num_classes=5, in_channels=1,
        ...                      image_size=32)
        >>> vit.patch_embed.img_size
        (32, 32)
    """
    found = _lookup(spec)
    if found is None:
        check_backbone(spec)  # a timm spec, or an error that lists what is registered
        return _build_timm(
            spec[len(TIMM_PREFIX) :],
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
        )
    entry, options = found
    model = entry.build(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"backbone {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_timm(name: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """``timm.create_model`` of ``name``, given ``img_size`` where its input size is fixed."""
    # Imported here: timm takes seconds to import and Conv4 users never need it.
    import timm

    options: dict[str, Any] = {}
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        options["img_size"] = image_size
    try:
        built: nn.Module = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options
        )
    except TypeError as error:
        if not options or "img_size" not in str(error):
            raise
        raise ValueError(
            f"timm model {name!r} has a fixed input size and does not take img_size, so it "
            f"cannot be built for {image_size}x{image_size} images; choose one that does "
            "(ViTs do) or one that pools globally (a CNN)"
        ) from error
    return built
