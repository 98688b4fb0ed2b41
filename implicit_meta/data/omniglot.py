"""Omniglot loading: source -> preprocessed (cached) characters -> protocol splits -> rotations."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from implicit_meta.data._cache import Arrays, cached_arrays
from implicit_meta.data.dataset import FewShotDataset
from implicit_meta.data.omniglot_meta import character_name
from implicit_meta.data.omniglot_sources import (
    EmbeddedOmniglot,
    OmniglotSource,
    find_omniglot_source,
)
from implicit_meta.data.preprocess import omniglot_ink_image
from implicit_meta.data.rotations import VALID_ANGLES, rotate_classes
from implicit_meta.data.splits import OmniglotProtocol, Splits, omniglot_character_split

__all__ = ["load_omniglot", "load_omniglot_characters"]

CACHE_VERSION = 1
"""Bumped whenever preprocessing changes, so stale cache files are never read."""


def _preprocess_all(source: OmniglotSource, image_size: int) -> Arrays:
    """Decode and preprocess every character of ``source`` (the slow path the cache avoids)."""
    ids: list[int] = []
    blocks: list[npt.NDArray[np.uint8]] = []
    for char_id, drawings in source.characters():
        ids.append(char_id)
        blocks.append(np.stack([omniglot_ink_image(d, image_size) for d in drawings]))
    if not blocks:
        raise ValueError("the Omniglot source holds no character folders")
    counts = {len(b) for b in blocks}
    if len(counts) != 1:
        raise ValueError(f"characters have different numbers of drawings: {sorted(counts)}")
    return {"images": np.stack(blocks), "char_ids": np.asarray(ids, dtype=np.int64)}


def _characters(
    root: str | os.PathLike[str] | None,
    image_size: int,
    cache_dir: str | os.PathLike[str] | None,
    use_cache: bool,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Return preprocessed images ``[C, 20, 1, S, S]`` uint8 and their ascending official ids."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    source: OmniglotSource = EmbeddedOmniglot() if root is None else find_omniglot_source(root)
    name = f"omniglot-{source.fingerprint()[:24]}-{image_size}px-v{CACHE_VERSION}.npz"

    def valid(arrays: Arrays) -> bool:
        images, ids = arrays.get("images"), arrays.get("char_ids")
        return (
            images is not None
            and ids is not None
            and images.dtype == np.uint8
            and images.shape[2:] == (1, image_size, image_size)
            and ids.shape == images.shape[:1]
        )

    arrays = cached_arrays(
        name,
        lambda: _preprocess_all(source, image_size),
        directory=cache_dir,
        enabled=use_cache,
        valid=valid,
    )
    return arrays["images"].astype(np.uint8, copy=False), arrays["char_ids"].astype(np.int64)


def load_omniglot_characters(
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> FewShotDataset:
    """Load every character of an Omniglot copy, unsplit and unrotated, in official id order.

    Args:
        root: ``None`` for the embedded copy, else a folder searched as described in
            :func:`~implicit_meta.data.omniglot_sources.find_omniglot_source`.
        image_size: Output height and width (LANCZOS resize from 105).
        cache_dir: Cache folder override (default ``$IMPLICIT_META_CACHE`` or
            ``~/.cache/implicit_meta``).
        use_cache: Read and write the preprocessing cache.

    Returns:
        uint8 images ``[num_characters, 20, 1, image_size, image_size]``, ink = 255, with names
        ``<split>/<Alphabet>/characterNN``.

    Raises:
        FileNotFoundError: If ``root`` holds no Omniglot data.
        ValueError: If ``image_size`` is not positive or the copy is malformed.

    Example:
        >>> chars = load_omniglot_characters()
        >>> chars.num_classes, chars.images_per_class
        (1623, 20)
    """
    images, ids = _characters(root, image_size, cache_dir, use_cache)
    names = tuple(character_name(int(i)) for i in ids)
    return FewShotDataset(torch.from_numpy(np.ascontiguousarray(images)), names)


def _angles(rotations: bool | Sequence[int]) -> tuple[int, ...]:
    if isinstance(rotations, bool):
        return VALID_ANGLES if rotations else (0,)
    return tuple(rotations)


def load_omniglot(
    root: str | os.PathLike[str] | None = None,
    *,
    protocol: OmniglotProtocol = "paper",
    image_size: int = 28,
    rotations: bool | Sequence[int] = True,
    test_rotations: bool | Sequence[int] = (0,),
    val_classes: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> Splits[FewShotDataset]:
    """Load Omniglot split by ``protocol``, preprocessed as in the iMAML paper.

    Images are 105x105 drawings resized with PIL LANCZOS to ``image_size`` and inverted so ink is
    1 (see :mod:`implicit_meta.data.preprocess`), stored as uint8 ``[classes, 20, 1, S, S]`` on
    the CPU; :class:`~implicit_meta.data.EpisodeSampler` turns draws into float32 in [0, 1].
    The preprocessed set is cached on disk under
    ``<cache>/omniglot-<source hash>-<S>px-v1.npz``, so only the first call resizes (a few
    seconds for the whole set). Rotation classes are added after splitting, so the rotations of
    a test character never reach meta-training.

    Args:
        root: ``None`` for the embedded copy (complete, MIT license); else a folder holding the
            official zips or their extracted folders (``ROOT/omniglot-py/images_background/``,
            as torchvision lays them out). A partial copy yields the subsets of the splits.
        protocol: ``"paper"`` (1200/423 characters from all alphabets, seeded) or ``"lake"``
            (30 background / 20 evaluation alphabets); see :mod:`implicit_meta.data.splits`.
        image_size: Output height and width.
        rotations: Meta-train rotations: True for 0/90/180/270 degrees (4x the classes), False
            for none, or a sequence of angles.
        test_rotations: The same for meta-test and validation (default: none).
        val_classes: Meta-train characters held out for validation (0: ``val`` is None).
        cache_dir: Cache folder override (default ``$IMPLICIT_META_CACHE``, else
            ``$XDG_CACHE_HOME/implicit_meta`` or ``~/.cache/implicit_meta``).
        use_cache: Read and write the preprocessing cache.

    Returns:
        The meta-train (with rotation classes if requested), validation (None if
        ``val_classes`` is 0) and meta-test classes, uint8 on the CPU.

    Raises:
        FileNotFoundError: If ``root`` holds no Omniglot data.
        ValueError: On an unknown protocol, invalid angles or sizes, or if a split would be
            empty for the characters present.

    Example:
        >>> splits = load_omniglot(protocol="lake", rotations=False)
        >>> splits.train.num_classes, splits.test.num_classes
        (964, 659)
    """
    split = omniglot_character_split(protocol, val_classes=val_classes)
    train_angles, test_angles = _angles(rotations), _angles(test_rotations)
    images, ids = _characters(root, image_size, cache_dir, use_cache)
    row_of = {int(cid): row for row, cid in enumerate(ids)}

    def subset(part: str, wanted: Sequence[int], angles: Sequence[int]) -> FewShotDataset:
        present = [cid for cid in wanted if cid in row_of]
        if not present:
            raise ValueError(
                f"the {part} split of protocol {protocol!r} is empty for this Omniglot copy"
            )
        rows = np.asarray([row_of[cid] for cid in present], dtype=np.int64)
        base = FewShotDataset(
            torch.from_numpy(images[rows]), tuple(character_name(cid) for cid in present)
        )
        return rotate_classes(base, angles)

    return Splits(
        train=subset("train", split.train, train_angles),
        val=None if split.val is None else subset("val", split.val, test_angles),
        test=subset("test", split.test, test_angles),
    )
