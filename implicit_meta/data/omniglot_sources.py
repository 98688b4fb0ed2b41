"""Where Omniglot drawings come from: the embedded arrays, a folder tree, or the official zips.

Every source yields characters in ascending official id (see :mod:`.omniglot_meta`), each as its
drawings in file-name order (``IIII_01.png`` .. ``IIII_20.png``), and exposes a fingerprint that
keys the preprocessing cache.
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from implicit_meta.data._cache import fingerprint_files, hash_bytes
from implicit_meta.data.omniglot_meta import OMNIGLOT_SPLITS, embedded_file, omniglot_alphabets

__all__ = [
    "EmbeddedOmniglot",
    "OmniglotFolder",
    "OmniglotSource",
    "OmniglotZip",
    "find_omniglot_source",
]

Character = tuple[int, list[Image.Image]]
"""An official character id and its drawings."""

_CHARACTER_DIR = re.compile(r"character(\d+)")


class OmniglotSource(Protocol):
    """Anything that can list and read Omniglot characters."""

    @property
    def character_ids(self) -> tuple[int, ...]:
        """Official ids of the characters present, ascending."""
        ...

    def fingerprint(self) -> str:
        """Return a hex string that changes whenever the source's pixels may have changed."""
        ...

    def characters(self) -> Iterator[Character]:
        """Yield ``(char_id, drawings)`` in ascending id order."""
        ...


def _character_id(split: str, alphabet: str, folder: str) -> int | None:
    """Return the official id of ``<split>/<alphabet>/<folder>``, None if not a character dir.

    Raises:
        ValueError: If the alphabet is not an Omniglot alphabet of ``split`` or the character
            number is out of range.
    """
    match = _CHARACTER_DIR.fullmatch(folder)
    if match is None:
        return None
    for row in omniglot_alphabets():
        if row.split == split and row.name == alphabet:
            number = int(match.group(1))
            if not 1 <= number <= row.num_characters:
                raise ValueError(f"{split}/{alphabet}/{folder}: no such character")
            return row.first_id + number - 1
    raise ValueError(f"{split}/{alphabet} is not an Omniglot alphabet of {split}")


@dataclass(frozen=True)
class EmbeddedOmniglot:
    """The complete Omniglot copy shipped in ``implicit_meta/data/embedded``.

    Example:
        >>> EmbeddedOmniglot().character_ids[:3]
        (1, 2, 3)
    """

    @property
    def character_ids(self) -> tuple[int, ...]:
        """All 1623 official ids."""
        return tuple(range(1, omniglot_alphabets()[-1].last_id + 1))

    def fingerprint(self) -> str:
        """Return the SHA-256 of the embedded arrays (about 6 MB, hashed in milliseconds)."""
        return hash_bytes(embedded_file(f"{s}.npz").read_bytes() for s in OMNIGLOT_SPLITS)

    def characters(self) -> Iterator[Character]:
        """Yield all 1623 characters as ``L`` images (0 ink, 255 background)."""
        next_id = 1
        for split in OMNIGLOT_SPLITS:
            raw = embedded_file(f"{split}.npz").read_bytes()
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                images = npz["images"]
            for row in images.view(np.uint8):
                # Compare with 0 instead of casting: the stored bools are not guaranteed to be
                # 0/1 bytes, and True (white) must become 255 like convert("L") of the PNG.
                gray = np.where(row != 0, np.uint8(255), np.uint8(0))
                yield next_id, [Image.fromarray(d) for d in gray]
                next_id += 1


@dataclass(frozen=True)
class OmniglotFolder:
    """One split extracted on disk: ``<folder>/<Alphabet>/characterNN/*.png``.

    This is what the official zips, torchvision (``ROOT/omniglot-py/images_background``) and
    the shared ``write_torchvision_layout.py`` produce.

    Attributes:
        split: ``"images_background"`` or ``"images_evaluation"``.
        folder: The split folder.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     OmniglotFolder("images_background", Path(d)).character_ids
        ()
    """

    split: str
    folder: Path

    @functools.cached_property
    def _files(self) -> dict[int, list[Path]]:
        files: dict[int, list[Path]] = {}
        # sorted(): directory listing order differs between file systems and runs.
        for alphabet in sorted(p for p in self.folder.iterdir() if p.is_dir()):
            for char_dir in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                char_id = _character_id(self.split, alphabet.name, char_dir.name)
                if char_id is not None:
                    files[char_id] = sorted(char_dir.glob("*.png"))
        return dict(sorted(files.items()))

    @property
    def character_ids(self) -> tuple[int, ...]:
        """Official ids of the character folders present, ascending."""
        return tuple(self._files)

    def fingerprint(self) -> str:
        """Return a hash of every PNG's relative path, size and modification time."""
        paths = [p for group in self._files.values() for p in group]
        return hash_bytes([self.split.encode(), fingerprint_files(paths, self.folder).encode()])

    def characters(self) -> Iterator[Character]:
        """Yield the characters, decoding their PNGs as ``L`` images."""
        for char_id, paths in self._files.items():
            drawings = []
            for path in paths:
                with Image.open(path) as image:
                    drawings.append(image.convert("L"))
            yield char_id, drawings


@dataclass(frozen=True)
class OmniglotZip:
    """One official zip (``images_background.zip`` or ``images_evaluation.zip``), read in place.

    Entries are matched as ``[prefix/]<split>/<Alphabet>/characterNN/<name>.png``; anything else
    (folder entries, ``__MACOSX`` metadata) is ignored. No checksum is enforced, so re-packed
    copies work too; the cache is keyed by the zip's content hash instead.

    Attributes:
        split: ``"images_background"`` or ``"images_evaluation"``.
        path: The zip file.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     z = Path(d) / "images_background.zip"
        ...     zipfile.ZipFile(z, "w").close()
        ...     OmniglotZip("images_background", z).character_ids
        ()
    """

    split: str
    path: Path

    @functools.cached_property
    def _members(self) -> dict[int, list[str]]:
        pattern = re.compile(rf"(?:.*/)?{self.split}/([^/]+)/([^/]+)/[^/]+\.png")
        members: dict[int, list[str]] = {}
        with zipfile.ZipFile(self.path) as archive:
            names = archive.namelist()
        for name in sorted(names):
            match = pattern.fullmatch(name)
            if match is None or name.startswith("__MACOSX/"):
                continue
            char_id = _character_id(self.split, match.group(1), match.group(2))
            if char_id is not None:
                members.setdefault(char_id, []).append(name)
        return dict(sorted(members.items()))

    @property
    def character_ids(self) -> tuple[int, ...]:
        """Official ids of the characters in the zip, ascending."""
        return tuple(self._members)

    def fingerprint(self) -> str:
        """Return the SHA-256 of the split name and the zip's bytes."""

        def chunks() -> Iterator[bytes]:
            yield self.split.encode()
            with open(self.path, "rb") as handle:
                while block := handle.read(1 << 20):
                    yield block

        return hash_bytes(chunks())

    def characters(self) -> Iterator[Character]:
        """Yield the characters, decoding each PNG from the zip in memory."""
        with zipfile.ZipFile(self.path) as archive:
            for char_id, names in self._members.items():
                drawings = []
                for name in names:
                    with Image.open(io.BytesIO(archive.read(name))) as image:
                        drawings.append(image.convert("L"))
                yield char_id, drawings


@dataclass(frozen=True)
class CombinedSource:
    """Several single-split sources read one after another (ids stay ascending).

    Attributes:
        parts: The sources, in ascending id order (background before evaluation).

    Example:
        >>> CombinedSource(()).character_ids
        ()
    """

    parts: Sequence[OmniglotSource]

    @property
    def character_ids(self) -> tuple[int, ...]:
        """Ids of all parts, ascending."""
        return tuple(cid for part in self.parts for cid in part.character_ids)

    def fingerprint(self) -> str:
        """Return the hash of the parts' fingerprints."""
        return hash_bytes(part.fingerprint().encode() for part in self.parts)

    def characters(self) -> Iterator[Character]:
        """Yield the characters of every part in turn."""
        for part in self.parts:
            yield from part.characters()


def _candidates(root: Path, split: str) -> list[Path]:
    return [
        root / "omniglot-py" / split,
        root / split,
        root / "omniglot-py" / f"{split}.zip",
        root / f"{split}.zip",
    ]


def find_omniglot_source(root: str | os.PathLike[str]) -> OmniglotSource:
    """Locate a user's Omniglot copy under ``root``.

    For each split the first of these that exists is used: ``ROOT/omniglot-py/<split>/``
    (torchvision's layout), ``ROOT/<split>/``, ``ROOT/omniglot-py/<split>.zip`` (where
    torchvision downloads the zips), ``ROOT/<split>.zip``. A copy may hold one split only, or a
    subset of the alphabets; character ids and splits stay those of the full set.

    Args:
        root: Folder that holds the copy.

    Returns:
        A source reading both splits (or the one present).

    Raises:
        FileNotFoundError: If neither split is found; the message lists every path tried.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     (Path(d) / "omniglot-py" / "images_background").mkdir(parents=True)
        ...     find_omniglot_source(d).character_ids
        ()
    """
    root_path = Path(root).expanduser()
    parts: list[OmniglotSource] = []
    tried: list[str] = []
    for split in OMNIGLOT_SPLITS:
        for candidate in _candidates(root_path, split):
            tried.append(str(candidate))
            if candidate.suffix == ".zip" and candidate.is_file():
                parts.append(OmniglotZip(split, candidate))
                break
            if candidate.suffix != ".zip" and candidate.is_dir():
                parts.append(OmniglotFolder(split, candidate))
                break
    if not parts:
        raise FileNotFoundError(
            f"no Omniglot data under {root_path}. Expected the official zips or their extracted "
            "folders at one of:\n  "
            + "\n  ".join(tried)
            + "\n(e.g. images_background.zip and images_evaluation.zip from the brendenlake/"
            "omniglot repository, folder 'python'). Call load_omniglot() without a root to use "
            "the copy embedded in implicit-meta."
        )
    return CombinedSource(tuple(parts))
