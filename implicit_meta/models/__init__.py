"""Few-shot backbones: the Conv4 of MAML/iMAML and any timm model, built from a spec string.

Example:
    >>> from implicit_meta.models import build_backbone
    >>> model = build_backbone("conv4", num_classes=5, in_channels=1, image_size=28)
    >>> type(model).__name__
    'Conv4'
"""

from implicit_meta.models.conv4 import Conv4, conv4_feature_size
from implicit_meta.models.registry import TIMM_PREFIX, build_backbone, list_backbones

__all__ = ["TIMM_PREFIX", "Conv4", "build_backbone", "conv4_feature_size", "list_backbones"]
