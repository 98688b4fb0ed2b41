"""The backbone registry: ``"conv4"``, ``"conv4-<width>"``, any timm model, and your own.

A backbone is a function ``build(*, num_classes, in_channels, image_size, **options)``
returning a freshly initialised ``nn.Module`` classifier. :func:`register_backbone` records
one under a name, the way timm's ``@register_model`` does; :func:`create_backbone` builds any
registered backbone from a spec string, the way timm's ``create_model`` does, so a user's own
network is one decorator away from ``TrainConfig(backbone="my_net")`` and
``implicit-meta train --backbone my_net``. Names, lookups and listing are those of the shared
:class:`~implicit_meta._registry.Registry`, as for inner solvers; the spec syntax
(``"<name>-<width>"``, ``"timm:<name>"``) is this module's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

from torch import nn

from implicit_meta._registry import Registry, close_matches, did_you_mean, filter_names
from implicit_meta.models.conv4 import Conv4

__all__ = [
    "TIMM_PREFIX",
    "BackboneBuilder",
    "check_backbone",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "unregister_backbone",
]

TIMM_PREFIX = "timm:"
"""Prefix of a timm model spec, e.g. ``"timm:resnet10t"``."""

_WIDTH_SUFFIX = re.compile(r"(?P<name>.+)-(?P<width>\d+)")


class BackboneBuilder(Protocol):
    """What :func:`register_backbone` accepts: a keyword-only builder of a fresh model.

    Example:
        >>> import torch
        >>> def linear(*, num_classes, in_channels, image_size):
        ...     return torch.nn.Linear(in_channels * image_size**2, num_classes)
        >>> builder: BackboneBuilder = linear
        >>> builder(num_classes=5, in_channels=1, image_size=2)
        Linear(in_features=4, out_features=5, bias=True)
    """

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


_BACKBONES: Registry[_Entry] = Registry(
    "backbone",
    decorator="register_backbone",
    hint=" (register your own with implicit_meta.models.register_backbone)",
)


@overload
def register_backbone(name: BuilderT, /) -> BuilderT: ...


@overload
def register_backbone(
    name: str | None = None, *, takes_width: bool = False, overwrite: bool = False
) -> Callable[[BuilderT], BuilderT]: ...


def register_backbone(
    name: str | BuilderT | None = None, *, takes_width: bool = False, overwrite: bool = False
) -> BuilderT | Callable[[BuilderT], BuilderT]:
    """Register a backbone builder, by default under its function's name; it is returned unchanged.

    Like timm's ``@register_model``: ``@register_backbone`` and ``@register_backbone()``
    register the builder under its ``__name__``, ``@register_backbone("name")`` under
    ``"name"``. Registering the same builder again with the same options changes nothing.

    Args:
        name: The spec that builds it (no ``":"``, which marks external libraries such as
            ``timm:``); default the function's name. (Used bare, as ``@register_backbone``,
            this is the function itself.)
        takes_width: The builder takes a ``width`` keyword, given as ``"<name>-<width>"``
            (as ``"conv4-32"``); ``"<name>"`` alone then uses the builder's default width.
        overwrite: Replace an existing registration of the same name instead of raising.

    Returns:
        A decorator that records the builder and returns it as it was; used bare, the builder
        itself, registered.

    Raises:
        ValueError: If ``name`` is empty, contains ``":"`` or is taken by another builder (and
            ``overwrite`` is false), or the builder has no usable name (a lambda) and none is
            given.
        TypeError: If the decorated object is not callable.

    Example:
        >>> import torch
        >>> @register_backbone("linear_doc_example")
        ... def linear(*, num_classes, in_channels, image_size):
        ...     return torch.nn.Sequential(
        ...         torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, num_classes))
        >>> create_backbone("linear_doc_example", num_classes=5, in_channels=1, image_size=28)[1]
        Linear(in_features=784, out_features=5, bias=True)
        >>> unregister_backbone("linear_doc_example")
        >>> @register_backbone
        ... def flat_linear(*, num_classes, in_channels, image_size):
        ...     return torch.nn.Sequential(
        ...         torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, num_classes))
        >>> list_backbones("flat_*")
        ['flat_linear']
        >>> unregister_backbone("flat_linear")
    """
    if callable(name):
        # Used bare: ``@register_backbone`` hands the builder over as ``name``.
        return register_backbone(takes_width=takes_width, overwrite=overwrite)(name)
    if name is not None and (not isinstance(name, str) or ":" in name):
        raise ValueError(f"backbone name must be a non-empty string without ':', got {name!r}")
    return _BACKBONES.decorator_for(
        name, lambda build: _Entry(build, takes_width), overwrite=overwrite
    )


def unregister_backbone(name: str) -> None:
    """Remove a registered backbone.

    Args:
        name: Registered name.

    Raises:
        KeyError: If nothing is registered under ``name`` (the message names close matches).

    Example:
        >>> register_backbone("tmp_doc_backbone")(lambda **sizes: None)
        <function <lambda> at ...>
        >>> unregister_backbone("tmp_doc_backbone")
    """
    _BACKBONES.remove(name)


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


def list_backbones(pattern: str | None = None) -> list[str]:
    """The backbone specs :func:`create_backbone` accepts; those matching ``pattern`` if given.

    Args:
        pattern: A shell-style pattern (``*``, ``?``, ``[seq]``, case-sensitive) matched against
            the specs listed, as in timm's ``list_models("resnet*")``.

    Returns:
        Each registered name, sorted (with ``"<name>-<width>"`` beside it where the builder
        takes a width), then ``"timm:<name>"``, where ``<name>`` is any name in
        ``timm.list_models()``.

    Example:
        >>> list_backbones()
        ['conv4', 'conv4-<width>', 'timm:<name>']
        >>> list_backbones("conv*")
        ['conv4', 'conv4-<width>']
    """
    specs: list[str] = []
    for name, entry in _BACKBONES.items():
        specs += [name, f"{name}-<width>"] if entry.takes_width else [name]
    return filter_names([*specs, TIMM_PREFIX + "<name>"], pattern)


def _lookup(spec: str) -> tuple[_Entry, dict[str, int]] | None:
    """The registered entry ``spec`` names, with its width option; None if there is none."""
    if spec in _BACKBONES:
        return _BACKBONES.get(spec), {}
    match = _WIDTH_SUFFIX.fullmatch(spec)
    if match is not None and match["name"] in _BACKBONES:
        entry = _BACKBONES.get(match["name"])
        if entry.takes_width:
            return entry, {"width": int(match["width"])}
    return None


def check_backbone(spec: str) -> None:
    """Raise unless :func:`create_backbone` knows ``spec``, without building anything.

    Args:
        spec: A registered name (``"conv4"``), ``"<name>-<width>"`` or ``"timm:<name>"``.

    Raises:
        ValueError: If the spec is not recognised or timm does not know the model; the message
            names the close matches.

    Example:
        >>> check_backbone("conv4-32")
        >>> check_backbone("conv5")
        Traceback (most recent call last):
        ...
        ValueError: unknown backbone 'conv5' (did you mean 'conv4'?); registered backbones: ...
    """
    if isinstance(spec, str) and _lookup(spec) is not None:
        return
    if isinstance(spec, str) and spec.startswith(TIMM_PREFIX):
        # Imported here: timm takes seconds to import and Conv4 users never need it.
        import timm

        name = spec[len(TIMM_PREFIX) :]
        if not name or not timm.is_model(name):
            matches = close_matches(name, timm.list_models()) if name else []
            raise ValueError(
                f"timm has no model {name!r}{did_you_mean(matches)}; see timm.list_models() "
                "for the available names"
            )
        return
    raise _BACKBONES.unknown(spec, known=list_backbones(), extra=_timm_suggestion(spec))


def _timm_suggestion(spec: object) -> str:
    """``"timm:<spec>"`` if ``spec`` is a timm model's name without the prefix, else ``""``."""
    if not isinstance(spec, str) or not spec:
        return ""
    try:
        import timm
    except ImportError:  # the "fewshot" extra is not installed: nothing to suggest
        return ""
    return TIMM_PREFIX + spec if timm.is_model(spec) else ""


def create_backbone(
    spec: str, *, num_classes: int, in_channels: int, image_size: int, **options: Any
) -> nn.Module:
    """Build a freshly initialised classifier from a spec string, like timm's ``create_model``.

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
        **options: More keywords for the builder (``timm.create_model`` for a timm spec, such
            as ``drop_rate=0.1``); a width comes from the spec, not from here.

    Returns:
        The model, as its builder returns it (Conv4 and timm: on the CPU in float32 and train
        mode).

    Raises:
        ValueError: If the spec is not recognised, timm does not know the model, ``width`` is
            given beside a ``"<name>-<width>"`` spec, or a timm model with a fixed input size
            does not take ``img_size``.
        TypeError: If a registered builder does not return an ``nn.Module``.

    Example:
        >>> model = create_backbone("conv4-32", num_classes=5, in_channels=1, image_size=28)
        >>> sum(p.numel() for p in model.parameters())
        28485
        >>> vit = create_backbone("timm:vit_tiny_patch16_224", num_classes=5, in_channels=1,
        ...                       image_size=32)
        >>> vit.patch_embed.img_size
        (32, 32)
    """
    found = _lookup(spec) if isinstance(spec, str) else None
    if found is None:
        check_backbone(spec)  # a timm spec, or an error that lists what is registered
        return _build_timm(
            spec[len(TIMM_PREFIX) :],
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            **options,
        )
    entry, from_spec = found
    clash = sorted(set(from_spec) & set(options))
    if clash:
        raise ValueError(
            f"backbone spec {spec!r} sets {', '.join(clash)} already; do not pass it again"
        )
    model = entry.build(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        **from_spec,
        **options,
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"backbone {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_timm(
    name: str, *, num_classes: int, in_channels: int, image_size: int, **options: Any
) -> nn.Module:
    """``timm.create_model`` of ``name``, given ``img_size`` where its input size is fixed."""
    # Imported here: timm takes seconds to import and Conv4 users never need it.
    import timm

    sized: dict[str, Any] = {}
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size and "img_size" not in options:
        sized["img_size"] = image_size
    try:
        built: nn.Module = timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_channels,
            **sized,
            **options,
        )
    except TypeError as error:
        if not sized or "img_size" not in str(error):
            raise
        raise ValueError(
            f"timm model {name!r} has a fixed input size and does not take img_size, so it "
            f"cannot be built for {image_size}x{image_size} images; choose one that does "
            "(ViTs do) or one that pools globally (a CNN)"
        ) from error
    return built
