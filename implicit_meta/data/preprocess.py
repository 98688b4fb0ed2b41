"""Omniglot image preprocessing, as in the iMAML paper code.

The reference (``aravindr93/imaml_dev``) does ``Image.open(png).convert("L")``, then
``resize((28, 28), resample=LANCZOS)`` and divides by 255. We do the same and additionally invert,
so that ink is 1 and background 0 (the convention of most few-shot code since MAML); the
``convert("L")`` matters: Pillow silently resizes 1-bit images with NEAREST whatever filter is
asked for. The result of a LANCZOS resize of an ``L`` image is already uint8, so storing
``255 - pixel`` as uint8 loses nothing: value / 255 is exactly the float the paper code computes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["omniglot_ink_image"]


def omniglot_ink_image(image: Image.Image, size: int = 28) -> npt.NDArray[np.uint8]:
    """Preprocess one Omniglot drawing: grayscale, LANCZOS resize, invert so ink is 255.

    Args:
        image: The drawing as read from the official PNG (mode ``"1"``) or any ``L``-convertible
            image with white background and dark ink.
        size: Output height and width in pixels (28 in the iMAML paper).

    Returns:
        ``uint8`` array ``[1, size, size]``; ``value / 255`` is the ink intensity in [0, 1].

    Raises:
        ValueError: If ``size`` is not positive.

    Example:
        >>> blank = Image.new("1", (105, 105), color=1)  # all white
        >>> out = omniglot_ink_image(blank)
        >>> out.shape, int(out.max())
        ((1, 28, 28), 0)
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    gray = image.convert("L")
    if gray.size != (size, size):
        gray = gray.resize((size, size), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.uint8)
    return (255 - pixels)[np.newaxis]
