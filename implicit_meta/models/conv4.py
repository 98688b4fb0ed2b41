"""The four-block convolutional backbone of MAML and iMAML (Finn et al. 2017; Rajeswaran 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Conv4", "conv4_feature_size"]


def conv4_feature_size(image_size: int, blocks: int = 4) -> int:
    """Side length of the feature map after ``blocks`` conv blocks (each halves it, rounding down).

    Args:
        image_size: Height and width of the (square) input.
        blocks: Number of conv blocks.

    Returns:
        The spatial side of the last feature map.

    Raises:
        ValueError: If the input is too small to survive ``blocks`` 2x2 max-pools.

    Example:
        >>> conv4_feature_size(28), conv4_feature_size(84)
        (1, 5)
    """
    side = image_size
    for _ in range(blocks):
        side //= 2
    if side < 1:
        raise ValueError(
            f"image_size {image_size} is too small for {blocks} 2x2 max-pools "
            f"(need at least {2**blocks})"
        )
    return side


class Conv4(nn.Module):
    """4 x [conv 3x3 (padding 1), BatchNorm, ReLU, 2x2 max-pool], flatten, linear head.

    It follows timm's split (``forward_features``, ``forward_head``, ``get_classifier``), so
    ``adapt="head"`` adapts the linear head alone on features computed once per batch.

    This is the backbone of the MAML and iMAML few-shot experiments (64 channels there; a
    narrower ``width`` trains faster on a CPU).

    BatchNorm semantics: by default the BatchNorm layers do not track running statistics
    (``track_running_stats=False``), so they always normalise with the statistics of the batch
    they see, in train and eval mode alike. This is the transductive convention of MAML/iMAML:
    during adaptation the support batch is normalised by its own statistics, and at evaluation
    the query batch of a task by its own. The model therefore has no buffers, and evaluating an
    adapted copy in eval mode gives the same result as in train mode. With
    ``track_running_stats=True`` the layers behave as ordinary BatchNorm; meta-training never
    writes the running statistics (see :class:`~implicit_meta.ImplicitMetaOptimizer`), so such a
    model must then be adapted and evaluated in train mode.

    Args:
        num_classes: Output logits (the ``N`` of N-way tasks).
        in_channels: Input channels (1 for Omniglot, 3 for Mini-ImageNet).
        width: Channels of every conv layer (64 in the papers).
        image_size: Height and width of the square input; fixes the head's input size.
        track_running_stats: Passed to every ``BatchNorm2d`` (see above).

    Raises:
        ValueError: If a size is not positive or the image is smaller than 16 pixels.

    Example:
        >>> model = Conv4(num_classes=5, in_channels=1, width=32, image_size=28)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        width: int = 64,
        image_size: int = 28,
        *,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("width", width),
            ("image_size", image_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        side = conv4_feature_size(image_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.BatchNorm2d(width, track_running_stats=track_running_stats),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * side * side, num_classes)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size

    def forward_features(self, x: Tensor) -> Tensor:
        """The last conv block's feature map (timm's ``forward_features``).

        Args:
            x: Images ``[B, in_channels, image_size, image_size]``.

        Returns:
            Features ``[B, width, side, side]``.
        """
        features: Tensor = self.features(x)
        return features

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Flatten the feature map and apply the linear head (timm's ``forward_head``).

        Args:
            x: What :meth:`forward_features` returned.
            pre_logits: Return the head's input (the flattened features) instead of logits.

        Returns:
            Logits ``[B, num_classes]``, or features ``[B, width * side * side]``.
        """
        flat = torch.flatten(x, 1)
        if pre_logits:
            return flat
        logits: Tensor = self.head(flat)
        return logits

    def get_classifier(self) -> nn.Module:
        """The linear head, the part that ``adapt="head"`` adapts (timm's ``get_classifier``).

        Returns:
            ``self.head``.
        """
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of images: ``forward_head(forward_features(x))``.

        Args:
            x: Images ``[B, in_channels, image_size, image_size]``.

        Returns:
            Logits ``[B, num_classes]``.
        """
        return self.forward_head(self.forward_features(x))
