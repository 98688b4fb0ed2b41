"""Rotated copies of classes as new classes (the standard Omniglot augmentation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from implicit_meta.data.dataset import FewShotDataset

__all__ = ["VALID_ANGLES", "rotate_classes"]

VALID_ANGLES = (0, 90, 180, 270)
"""Rotation angles in degrees that map the pixel grid onto itself."""


def rotate_classes(dataset: FewShotDataset, angles: Sequence[int]) -> FewShotDataset:
    """Turn every class into one class per rotation angle.

    Rotation is counter-clockwise (as ``PIL.Image.rotate`` and ``numpy.rot90``). Class ``c``
    becomes classes ``c * len(angles) + r`` for ``r`` indexing ``angles``, named
    ``<name>/rot<angle>``; angle 0 keeps the plain name. Rotating by multiples of 90 degrees
    only permutes pixels, so uint8 images stay exact.

    Args:
        dataset: Classes to rotate; images must be square.
        angles: Distinct angles from ``(0, 90, 180, 270)``.

    Returns:
        The dataset with ``len(angles) * num_classes`` classes.

    Raises:
        ValueError: If an angle is invalid or repeated, ``angles`` is empty, or images are not
            square.

    Example:
        >>> ds = FewShotDataset(torch.zeros(2, 3, 1, 8, 8, dtype=torch.uint8), ("a", "b"))
        >>> rotate_classes(ds, (0, 90)).class_names
        ('a', 'a/rot90', 'b', 'b/rot90')
    """
    if not angles or len(set(angles)) != len(angles) or any(a not in VALID_ANGLES for a in angles):
        raise ValueError(f"angles must be distinct values from {VALID_ANGLES}, got {angles}")
    _, height, width = dataset.image_shape
    if height != width:
        raise ValueError(f"rotating needs square images, got {height}x{width}")
    if tuple(angles) == (0,):
        return dataset
    # rot90 rotates from the first towards the second of `dims`; with (H, W) = (-2, -1) that is
    # counter-clockwise on screen, the direction of PIL and numpy.
    rotated = torch.stack(
        [torch.rot90(dataset.images, k=a // 90, dims=(-2, -1)) for a in angles], dim=1
    )
    images = rotated.reshape(-1, *rotated.shape[2:])
    names = tuple(
        name if a == 0 else f"{name}/rot{a}" for name in dataset.class_names for a in angles
    )
    return FewShotDataset(images, names)
