"""Omniglot metadata: the 50 alphabets, their splits and the official character ids.

Official Omniglot numbers its 1623 characters 1..1623 (the ``IIII`` of ``IIII_DD.png``):
ids 1..964 are the 30 ``images_background`` alphabets, 965..1623 the 20 ``images_evaluation``
alphabets. ``alphabets.csv`` (embedded) gives each alphabet's id range, so the id of
``<split>/<Alphabet>/characterNN`` is ``first_id + NN - 1`` no matter where the images came from.
Everything in this package orders characters by this id, never by directory listing order.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

__all__ = [
    "NUM_BACKGROUND_CHARACTERS",
    "NUM_CHARACTERS",
    "OMNIGLOT_SPLITS",
    "OmniglotAlphabet",
    "character_name",
    "omniglot_alphabets",
]

OMNIGLOT_SPLITS: tuple[str, str] = ("images_background", "images_evaluation")
"""The two official splits, in character-id order."""

NUM_CHARACTERS = 1623
"""Number of Omniglot characters (classes before rotation)."""

NUM_BACKGROUND_CHARACTERS = 964
"""Number of characters in the 30 background alphabets (ids 1..964)."""


def embedded_file(name: str) -> Traversable:
    """Return a file of the embedded Omniglot copy (works from wheels and zip imports too).

    Args:
        name: File name inside ``implicit_meta/data/embedded``.

    Returns:
        A readable resource handle.

    Example:
        >>> embedded_file("alphabets.csv").name
        'alphabets.csv'
    """
    return resources.files("implicit_meta.data").joinpath("embedded", name)


@dataclass(frozen=True)
class OmniglotAlphabet:
    """One Omniglot alphabet and its range of official character ids.

    Attributes:
        split: ``"images_background"`` or ``"images_evaluation"``.
        name: Folder name of the alphabet, e.g. ``"Japanese_(hiragana)"``.
        first_id: Official id of ``character01``.
        last_id: Official id of the last character.

    Example:
        >>> a = OmniglotAlphabet("images_background", "Arcadian", 1, 26)
        >>> a.num_characters
        26
    """

    split: str
    name: str
    first_id: int
    last_id: int

    @property
    def num_characters(self) -> int:
        """Number of characters in the alphabet."""
        return self.last_id - self.first_id + 1


@functools.cache
def omniglot_alphabets() -> tuple[OmniglotAlphabet, ...]:
    """Return the 50 alphabets in official id order, read from the embedded ``alphabets.csv``.

    Returns:
        The alphabets, ids ascending.

    Raises:
        ValueError: If the embedded table is inconsistent (ids not contiguous from 1 to 1623).

    Example:
        >>> alphabets = omniglot_alphabets()
        >>> len(alphabets), alphabets[0].name, alphabets[-1].last_id
        (50, 'Arcadian', 1623)
    """
    text = embedded_file("alphabets.csv").read_text(encoding="utf-8")
    rows = [
        OmniglotAlphabet(r["split"], r["alphabet"], int(r["first_id"]), int(r["last_id"]))
        for r in csv.DictReader(io.StringIO(text))
    ]
    expected_first = 1
    for row in rows:
        # The id arithmetic everywhere else relies on contiguous ranges; check once, loudly.
        if row.first_id != expected_first or row.split not in OMNIGLOT_SPLITS:
            raise ValueError(f"alphabets.csv is inconsistent at {row}")
        expected_first = row.last_id + 1
    if expected_first != NUM_CHARACTERS + 1:
        raise ValueError("alphabets.csv does not cover character ids 1..1623")
    return tuple(rows)


@functools.cache
def _alphabet_of_id() -> dict[int, OmniglotAlphabet]:
    return {cid: a for a in omniglot_alphabets() for cid in range(a.first_id, a.last_id + 1)}


def character_name(char_id: int) -> str:
    """Return the path-like name ``<split>/<Alphabet>/characterNN`` of an official id.

    Args:
        char_id: Official character id, 1..1623.

    Returns:
        The name, as the character's folder is called in the official release.

    Raises:
        KeyError: If ``char_id`` is not an Omniglot character id.

    Example:
        >>> character_name(1)
        'images_background/Arcadian/character01'
        >>> character_name(1623)
        'images_evaluation/ULOG/character26'
    """
    alphabet = _alphabet_of_id()[char_id]
    return f"{alphabet.split}/{alphabet.name}/character{char_id - alphabet.first_id + 1:02d}"
