"""Train / validation / test splits: the container every loader returns, and Omniglot's splits.

:class:`Splits` holds the meta-train, optional validation and meta-test parts of one dataset;
:func:`~implicit_meta.data.load_omniglot`, :func:`~implicit_meta.data.load_mini_imagenet`,
:func:`implicit_meta.fewshot.load_splits` (datasets) and :func:`omniglot_character_split`
(character ids) all return one.

Omniglot has two split protocols (:data:`PROTOCOLS`), both class-disjoint at the level of
characters (so all rotations of a test character stay out of meta-training, because rotations
are added after splitting):

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
from typing import Generic, Literal, TypeVar, get_args

import numpy as np
import numpy.typing as npt

from implicit_meta.data.omniglot_meta import NUM_BACKGROUND_CHARACTERS, NUM_CHARACTERS

__all__ = [
    "PAPER_NUM_TRAIN",
    "PROTOCOLS",
    "SPLIT_SEED",
    "OmniglotProtocol",
    "Splits",
    "check_protocol",
    "omniglot_character_split",
]

T = TypeVar("T")

OmniglotProtocol = Literal["paper", "lake"]
"""Name of an Omniglot split protocol."""

PROTOCOLS: tuple[OmniglotProtocol, ...] = get_args(OmniglotProtocol)
"""The Omniglot split protocols, ``("paper", "lake")``: the one list every check reads."""

SPLIT_SEED = 0
"""Seed of the ``numpy.random.default_rng`` permutations that define the splits."""

PAPER_NUM_TRAIN = 1200
"""Meta-train characters (validation included) of the ``"paper"`` protocol."""


@dataclass(frozen=True, kw_only=True)
class Splits(Generic[T]):
    """The meta-train, optional validation and meta-test parts of one dataset, class-disjoint.

    Fields are keyword-only, so a test set can never be passed where validation was meant.

    Attributes:
        train: Classes tasks are meta-trained on.
        val: Validation classes for model selection, or None when the dataset has none or none
            was requested.
        test: Held-out classes tasks are evaluated on.

    Example:
        >>> s = Splits(train=(1, 2, 3), test=(4, 5))
        >>> s.val is None, s.test
        (True, (4, 5))
        >>> Splits(train=(1, 2), val=(3,), test=(4,)).val
        (3,)
    """

    train: T
    val: T | None = None
    test: T


def check_protocol(protocol: str) -> OmniglotProtocol:
    """Return ``protocol`` if it names an Omniglot split protocol, else refuse it.

    Args:
        protocol: The name to check.

    Returns:
        ``protocol``, typed as an :data:`OmniglotProtocol`.

    Raises:
        ValueError: If ``protocol`` is not one of :data:`PROTOCOLS`.

    Example:
        >>> check_protocol("lake")
        'lake'
        >>> check_protocol("vinyals")
        Traceback (most recent call last):
        ...
        ValueError: protocol must be one of paper, lake; got 'vinyals'
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    return protocol


def _sorted(ids: npt.NDArray[np.int64]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.sort(ids))


def omniglot_character_split(
    protocol: OmniglotProtocol = "paper", *, val_classes: int = 0
) -> Splits[tuple[int, ...]]:
    """Return the official character ids of each split of ``protocol`` (see the module docstring).

    Args:
        protocol: ``"paper"`` or ``"lake"``.
        val_classes: Number of meta-train characters to hold out for validation.

    Returns:
        The ids of each split, ascending; ``val`` is None when ``val_classes`` is 0.

    Raises:
        ValueError: If ``protocol`` is unknown or ``val_classes`` is negative or would leave no
            meta-training character.

    Example:
        >>> s = omniglot_character_split("paper", val_classes=100)
        >>> len(s.train), len(s.val), len(s.test)
        (1100, 100, 423)
        >>> omniglot_character_split("lake").val is None
        True
    """
    protocol = check_protocol(protocol)
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
    return Splits(
        train=_sorted(train_order[:cut]),
        val=_sorted(train_order[cut:]) if val_classes else None,
        test=_sorted(test),
    )
