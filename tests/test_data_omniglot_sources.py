"""Omniglot from a user's copy: torchvision folder layout and the official zips.

Fixtures write a few characters from the embedded arrays as 1-bit PNGs in the official layout
(``<split>/<Alphabet>/characterNN/IIII_DD.png``, as shared/data/omniglot/
write_torchvision_layout.py does), so expected pixels come straight from the npz.
"""

from __future__ import annotations

import csv
import io
import os
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import implicit_meta.data as imd
from implicit_meta.data import load_omniglot, load_omniglot_characters
from implicit_meta.data.omniglot_meta import character_name

EMBEDDED = Path(imd.__file__).parent / "embedded"
PERM = np.random.default_rng(0).permutation(1623) + 1  # documented "paper" protocol order


def _alphabets() -> list[dict[str, str]]:
    with open(EMBEDDED / "alphabets.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _subset_ids() -> list[int]:
    """Two or three characters of six alphabets, both splits, paper-train and paper-test."""
    train, test = set(PERM[:1200].tolist()), set(PERM[1200:].tolist())
    chosen: list[int] = []
    for row in _alphabets():
        if row["alphabet"] not in {"Arcadian", "Korean", "Braille", "Angelic", "ULOG", "Keble"}:
            continue
        ids = range(int(row["first_id"]), int(row["last_id"]) + 1)
        chosen += [i for i in ids if i in train][:2] + [i for i in ids if i in test][:1]
    return sorted(chosen)


SUBSET = _subset_ids()


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    parts = [np.load(EMBEDDED / f"{s}.npz")["images"] for s in imd.omniglot_meta.OMNIGLOT_SPLITS]
    return np.concatenate(parts)


def _png_bytes(drawing: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(drawing).save(buffer, format="PNG")  # bool -> 1-bit PNG like the originals
    return buffer.getvalue()


def _entries(raw: np.ndarray, ids: list[int]) -> dict[str, bytes]:
    """Relative path -> PNG bytes for every drawing of ``ids``."""
    entries = {}
    for row in _alphabets():
        first, last = int(row["first_id"]), int(row["last_id"])
        for cid in ids:
            if first <= cid <= last:
                folder = f"{row['split']}/{row['alphabet']}/character{cid - first + 1:02d}"
                for d in range(20):
                    entries[f"{folder}/{cid:04d}_{d + 1:02d}.png"] = _png_bytes(raw[cid - 1, d])
    return entries


@pytest.fixture(scope="module")
def entries(raw: np.ndarray) -> dict[str, bytes]:
    return _entries(raw, SUBSET)


@pytest.fixture
def folder_root(tmp_path: Path, entries: dict[str, bytes]) -> Path:
    # Create in reverse order so that creation/listing order differs from sorted order.
    for rel, data in sorted(entries.items(), reverse=True):
        path = tmp_path / "omniglot-py" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tmp_path


@pytest.fixture
def zip_root(tmp_path: Path, entries: dict[str, bytes]) -> Path:
    items = list(entries.items())
    random.Random(0).shuffle(items)  # member order in the archive must not matter
    for split in imd.omniglot_meta.OMNIGLOT_SPLITS:
        with zipfile.ZipFile(tmp_path / f"{split}.zip", "w") as archive:
            archive.writestr(f"{split}/", b"")
            archive.writestr("__MACOSX/ignored.txt", b"x")
            for rel, data in items:
                if rel.startswith(split + "/"):
                    archive.writestr(rel, data)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMPLICIT_META_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def expected_raw(raw: np.ndarray, ids: list[int]) -> np.ndarray:
    """uint8 ink images [C, 20, 1, 105, 105] computed from the npz with numpy alone."""
    return np.where(raw[np.asarray(ids) - 1], 0, 255).astype(np.uint8)[:, :, None]


def pil_reference(raw: np.ndarray, ids: list[int], size: int) -> np.ndarray:
    out = np.empty((len(ids), 20, 1, size, size), dtype=np.uint8)
    for i, cid in enumerate(ids):
        for d in range(20):
            image = Image.fromarray(raw[cid - 1, d]).convert("L")
            resized = image.resize((size, size), resample=Image.Resampling.LANCZOS)
            out[i, d, 0] = 255 - np.asarray(resized)
    return out


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_user_copy_equals_raw_pixels(
    layout: str, folder_root: Path, zip_root: Path, raw: np.ndarray
) -> None:
    root = folder_root if layout == "folder" else zip_root
    if layout == "zip":
        assert not (root / "omniglot-py" / "images_background.zip").exists()
    chars = load_omniglot_characters(root, image_size=105, use_cache=False)
    assert chars.images.dtype == torch.uint8
    assert np.array_equal(chars.images.numpy(), expected_raw(raw, SUBSET))
    assert list(chars.class_names) == [character_name(i) for i in SUBSET]


def test_zip_member_may_live_under_omniglot_py(zip_root: Path, raw: np.ndarray) -> None:
    nested = zip_root / "omniglot-py"
    nested.mkdir()
    for split in imd.omniglot_meta.OMNIGLOT_SPLITS:
        (zip_root / f"{split}.zip").rename(nested / f"{split}.zip")
    chars = load_omniglot_characters(zip_root, image_size=105, use_cache=False)
    assert np.array_equal(chars.images.numpy(), expected_raw(raw, SUBSET))


@pytest.mark.parametrize("size", [28, 20])
def test_folder_and_zip_preprocessed_like_pil(
    size: int, folder_root: Path, zip_root: Path, raw: np.ndarray
) -> None:
    ids = SUBSET[:4]
    reference = pil_reference(raw, ids, size)
    for root in (folder_root, zip_root):
        chars = load_omniglot_characters(root, image_size=size, use_cache=False)
        assert chars.images.shape == (len(SUBSET), 20, 1, size, size)
        assert np.array_equal(chars.images[:4].numpy(), reference)


def test_user_copy_equals_embedded_subset(
    folder_root: Path, zip_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Same session-wide cache folder as test_data_omniglot.py, so the full embedded set is
    # resized once per test session, whichever module runs first.
    shared = tmp_path_factory.getbasetemp() / "implicit-meta-cache"
    embedded = load_omniglot_characters(cache_dir=shared)
    rows = [i - 1 for i in SUBSET]
    for root in (folder_root, zip_root):
        chars = load_omniglot_characters(root)
        assert torch.equal(chars.images, embedded.images[rows])


def test_listing_order_does_not_matter(folder_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    normal = load_omniglot_characters(folder_root, use_cache=False)
    original = Path.iterdir

    def reversed_iterdir(self: Path) -> Iterator[Path]:
        return iter(sorted(original(self), reverse=True))

    monkeypatch.setattr(Path, "iterdir", reversed_iterdir)
    shuffled = load_omniglot_characters(folder_root, use_cache=False)
    assert torch.equal(normal.images, shuffled.images)
    assert normal.class_names == shuffled.class_names


def test_protocols_on_partial_copy(folder_root: Path) -> None:
    paper = load_omniglot(folder_root, rotations=False, use_cache=False)
    train = {character_name(i) for i in SUBSET if i in set(PERM[:1200].tolist())}
    test = {character_name(i) for i in SUBSET if i in set(PERM[1200:].tolist())}
    assert set(paper.train.class_names) == train
    assert set(paper.test.class_names) == test
    lake = load_omniglot(folder_root, protocol="lake", use_cache=False)
    assert all(n.startswith("images_background/") for n in lake.train.class_names)
    assert all(n.startswith("images_evaluation/") for n in lake.test.class_names)
    assert lake.train.num_classes == 4 * sum(i <= 964 for i in SUBSET)


def test_only_one_split_present(tmp_path: Path, raw: np.ndarray) -> None:
    ids = [i for i in SUBSET if i <= 964]
    for rel, data in _entries(raw, ids).items():
        path = tmp_path / "images_background" / rel.split("/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    chars = load_omniglot_characters(tmp_path, image_size=105, use_cache=False)
    assert np.array_equal(chars.images.numpy(), expected_raw(raw, ids))
    with pytest.raises(ValueError, match="test split"):
        load_omniglot(tmp_path, protocol="lake", use_cache=False)


def test_cache_written_reused_and_invalidated(
    folder_root: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path_factory.mktemp("cache-folder")
    first = load_omniglot_characters(folder_root, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.endswith("-28px-v1.npz")

    calls = []
    real = imd.omniglot.omniglot_ink_image

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("implicit_meta.data.omniglot.omniglot_ink_image", counting)
    warm = load_omniglot_characters(folder_root, cache_dir=cache)
    assert not calls and torch.equal(warm.images, first.images)

    # Changing a drawing changes the fingerprint: a new cache entry with the new pixels.
    victim = sorted((folder_root / "omniglot-py").rglob("*.png"))[0]
    Image.fromarray(np.ones((105, 105), dtype=bool)).save(victim)
    os.utime(victim, ns=(1, 1))
    changed = load_omniglot_characters(folder_root, cache_dir=cache)
    assert calls and len(list(cache.iterdir())) == 2
    assert int(changed.images[0, 0].max()) == 0  # the blank drawing has no ink
    assert torch.equal(changed.images[0, 1:], first.images[0, 1:])


def test_corrupt_cache_file_is_rebuilt(
    folder_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = tmp_path_factory.mktemp("cache-corrupt")
    good = load_omniglot_characters(folder_root, cache_dir=cache)
    (path,) = cache.iterdir()
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="cache"):
        again = load_omniglot_characters(folder_root, cache_dir=cache)
    assert torch.equal(again.images, good.images)
    assert path.read_bytes()[:2] == b"PK"  # rewritten as a valid npz (zip) file


def test_missing_copy_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_omniglot(tmp_path)
    message = str(info.value)
    for expected in ("omniglot-py", "images_background.zip", "images_evaluation.zip"):
        assert expected in message


def test_unknown_alphabet_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "omniglot-py" / "images_background" / "Klingon" / "character01"
    folder.mkdir(parents=True)
    Image.fromarray(np.ones((105, 105), dtype=bool)).save(folder / "0001_01.png")
    with pytest.raises(ValueError, match="Klingon"):
        load_omniglot_characters(tmp_path, use_cache=False)


def test_evaluation_alphabet_in_background_folder_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "images_background" / "ULOG" / "character01"
    folder.mkdir(parents=True)
    Image.fromarray(np.ones((105, 105), dtype=bool)).save(folder / "1598_01.png")
    with pytest.raises(ValueError, match="ULOG"):
        load_omniglot_characters(tmp_path, use_cache=False)


def test_uneven_drawings_rejected(folder_root: Path) -> None:
    next(iter(sorted((folder_root / "omniglot-py").rglob("*.png")))).unlink()
    with pytest.raises(ValueError, match="numbers of drawings"):
        load_omniglot_characters(folder_root, use_cache=False)
