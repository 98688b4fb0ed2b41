"""The in-memory container of a few-shot split: every image of every class in one tensor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["FewShotDataset"]


@dataclass(frozen=True)
class FewShotDataset:
    """All images of a few-shot split, grouped by class.

    Every class holds the same number of images, so the whole split is one tensor and an episode
    is a single advanced-indexing gather (see :class:`~implicit_meta.data.EpisodeSampler`).
    Images are normally kept as ``uint8`` (value / 255 is the pixel intensity in [0, 1]) because
    that is 4x smaller than float32; the sampler converts only the images it draws.

    Attributes:
        images: Tensor ``[num_classes, images_per_class, channels, height, width]``, ``uint8``
            (intensity = value / 255) or floating point (intensity as is).
        class_names: One stable, human-readable name per class, in the order of ``images``.

    Example:
        >>> ds = FewShotDataset(torch.zeros(3, 5, 1, 28, 28, dtype=torch.uint8), ("a", "b", "c"))
        >>> ds.num_classes, ds.images_per_class, ds.image_shape
        (3, 5, (1, 28, 28))
    """

    images: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        """Validate shape, dtype and names.

        Raises:
            ValueError: If ``images`` is not 5-D, has an unsupported dtype, or the number of
                names does not match the number of classes.
        """
        if self.images.dim() != 5:
            raise ValueError(
                "images must be [num_classes, images_per_class, C, H, W], "
                f"got shape {tuple(self.images.shape)}"
            )
        if self.images.dtype != torch.uint8 and not self.images.dtype.is_floating_point:
            raise ValueError(f"images must be uint8 or floating point, got {self.images.dtype}")
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError(
                f"{len(self.class_names)} class names for {self.images.shape[0]} classes"
            )
        # A frozen dataclass still accepts a list; store a tuple so the object stays hashable
        # and nobody mutates the names behind the images' back.
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        """Return the number of classes."""
        return self.num_classes

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return int(self.images.shape[0])

    @property
    def images_per_class(self) -> int:
        """Number of images in every class."""
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        c, h, w = self.images.shape[2:]
        return int(c), int(h), int(w)

    @property
    def device(self) -> torch.device:
        """Device the images live on."""
        return self.images.device

    def to(self, device: torch.device | str) -> FewShotDataset:
        """Return a copy whose images live on ``device`` (no copy if already there).

        Args:
            device: Target device.

        Returns:
            The dataset on ``device``.

        Example:
            >>> ds = FewShotDataset(torch.zeros(1, 2, 1, 4, 4, dtype=torch.uint8), ("a",))
            >>> ds.to("cpu").device
            device(type='cpu')
        """
        return FewShotDataset(self.images.to(torch.device(device)), self.class_names)

    def select(self, classes: Sequence[int]) -> FewShotDataset:
        """Return the dataset restricted to the given class indices, in that order.

        Args:
            classes: Indices into ``class_names``.

        Returns:
            A new dataset with ``len(classes)`` classes.

        Raises:
            IndexError: If an index is out of range.

        Example:
            >>> ds = FewShotDataset(torch.zeros(3, 2, 1, 4, 4, dtype=torch.uint8), ("a", "b", "c"))
            >>> ds.select([2, 0]).class_names
            ('c', 'a')
        """
        for c in classes:
            if not -self.num_classes <= c < self.num_classes:
                raise IndexError(f"class index {c} out of range for {self.num_classes} classes")
        index = torch.as_tensor(list(classes), dtype=torch.int64, device=self.images.device)
        return FewShotDataset(
            self.images.index_select(0, index), tuple(self.class_names[c] for c in classes)
        )
