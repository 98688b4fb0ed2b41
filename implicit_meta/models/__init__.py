"""Few-shot backbones, built from a spec string: the Conv4 of MAML/iMAML, any timm model, yours.

Example:
    >>> from implicit_meta.models import create_backbone
    >>> model = create_backbone("conv4", num_classes=5, in_channels=1, image_size=28)
    >>> type(model).__name__
    'Conv4'
"""

from implicit_meta.models.conv4 import Conv4, conv4_feature_size
from implicit_meta.models.registry import (
    TIMM_PREFIX,
    BackboneBuilder,
    create_backbone,
    list_backbones,
    register_backbone,
    unregister_backbone,
)

__all__ = [
    "TIMM_PREFIX",
    "BackboneBuilder",
    "Conv4",
    "conv4_feature_size",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "unregister_backbone",
]
