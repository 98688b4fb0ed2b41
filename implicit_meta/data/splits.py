"""Omniglot meta-train / validation / meta-test character splits.

Two protocols, both class-disjoint at the level of characters (so all rotations of a test
character stay out of meta-training, because rotations are added after splitting):

``"paper"`` (iMAML, Rajeswaran et al. 2019, following Finn et al. 2017)
    ``numpy.random.default_rng(0).permutation(1623)`` of the official character ids 1..1623 in
    ascending order; the first 1200 are meta-train, the remaining 423 meta-test. Both draw from
    all 50 alphabets. (The paper code shuffles with Python's ``random`` and a listing order that
    is not stable across machines, so its exact split cannot be reproduced; this one can.)

``"lake"`` (Lake et al. 2015)
    The 964 characters of the 30 background alphabets are meta-train, the 659 characters of the
    20 evaluation alphabets meta-test.

Validation (optional, ``val_classes > 0``): the last ``val_classes`` meta-train characters in
the protocol's seeded order become validation and leave meta-train. For ``"paper"`` that order
is the permutation above (positions ``1200 - val_classes`` .. 1199); for ``"lake"`` it is
``default_rng(0).permutation`` of the background ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from implicit_meta.data.omniglot_meta import NUM_BACKGROUND_CHARACTERS, NUM_CHARACTERS

__all__ = [
    "PAPER_NUM_TRAIN",
    "SPLIT_SEED",
    "CharacterSplit",
    "OmniglotProtocol",
    "omniglot_character_split",
]

OmniglotProtocol = Literal["paper", "lake"]
"""Name of a split protocol."""

SPLIT_SEED = 0
"""Seed of the ``numpy.random.default_rng`` permutations that define the splits."""

PAPER_NUM_TRAIN = 1200
"""Meta-train characters (validation included) of the ``"paper"`` protocol."""


@dataclass(frozen=True)
class CharacterSplit:
    """Official character ids of each split, ascending.

    Attributes:
        train: Meta-training characters.
        val: Validation characters (empty unless requested).
        test: Meta-test characters.

    Example:
        >>> s = omniglot_character_split("lake")
        >>> len(s.train), len(s.val), len(s.test)
        (964, 0, 659)
    """

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


def _sorted(ids: npt.NDArray[np.int64]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.sort(ids))


def omniglot_character_split(
    protocol: OmniglotProtocol = "paper", *, val_classes: int = 0
) -> CharacterSplit:
    """Return the character ids of each split of ``protocol`` (see the module docstring).

    Args:
        protocol: ``"paper"`` or ``"lake"``.
        val_classes: Number of meta-train characters to hold out for validation.

    Returns:
        The split of the full 1623 characters.

    Raises:
        ValueError: If ``protocol`` is unknown or ``val_classes`` is negative or would leave no
            meta-training character.

    Example:
        >>> s = omniglot_character_split("paper", val_classes=100)
        >>> len(s.train), len(s.val), len(s.test)
        (1100, 100, 423)
    """
    if protocol not in get_args(OmniglotProtocol):
        raise ValueError(f"unknown protocol {protocol!r}; use one of {get_args(OmniglotProtocol)}")
    ids = np.arange(1, NUM_CHARACTERS + 1)
    rng = np.random.default_rng(SPLIT_SEED)
    if protocol == "paper":
        order = ids[rng.permutation(NUM_CHARACTERS)]
        train_order, test = order[:PAPER_NUM_TRAIN], order[PAPER_NUM_TRAIN:]
    else:
        background = ids[:NUM_BACKGROUND_CHARACTERS]
        train_order = background[rng.permutation(NUM_BACKGROUND_CHARACTERS)]
        test = ids[NUM_BACKGROUND_CHARACTERS:]
    if not 0 <= val_classes < len(train_order):
        raise ValueError(
            f"val_classes must be in [0, {len(train_order)}) for protocol {protocol!r}, "
            f"got {val_classes}"
        )
    cut = len(train_order) - val_classes
    return CharacterSplit(
        train=_sorted(train_order[:cut]), val=_sorted(train_order[cut:]), test=_sorted(test)
    )
