"""Omniglot from the embedded copy: files, preprocessing, cache, protocols, rotations.

References are computed here independently of the package: PIL directly on the raw npz pixels,
the documented numpy permutation, the alphabets table read with csv, numpy/PIL rotations.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import implicit_meta.data as imd
from implicit_meta.data import EpisodeSampler, FewShotDataset, load_omniglot

EMBEDDED = Path(imd.__file__).parent / "embedded"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"

# Published in the Omniglot copy's README (shared/data/omniglot/README.md).
SHA256 = {
    "images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
}


def shared_cache(factory: pytest.TempPathFactory) -> Path:
    # One cache for the whole session (the base temp dir is per session), so the 32k-image
    # resize runs once even though two test modules load the embedded set.
    return factory.getbasetemp() / "implicit-meta-cache"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = shared_cache(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        # Never touch the real ~/.cache from tests, even through a forgotten cache_dir.
        mp.setenv("IMPLICIT_META_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    """All 1623 x 20 raw drawings (True = white background), in official id order."""
    parts = [np.load(EMBEDDED / name)["images"] for name in sorted(SHA256)]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def name_to_id() -> dict[str, int]:
    with open(EMBEDDED / "alphabets.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = {}
    for r in rows:
        first, last = int(r["first_id"]), int(r["last_id"])
        for n in range(1, last - first + 2):
            table[f"{r['split']}/{r['alphabet']}/character{n:02d}"] = first + n - 1
    return table


@pytest.fixture(scope="module")
def chars(cache: Path) -> FewShotDataset:
    return imd.load_omniglot_characters(cache_dir=cache)


@pytest.fixture(scope="module")
def paper(cache: Path, chars: FewShotDataset) -> imd.Splits[FewShotDataset]:
    return load_omniglot(cache_dir=cache)


def base_id(name: str, name_to_id: dict[str, int]) -> int:
    return name_to_id["/".join(name.split("/")[:3])]


def pil_reference(drawing: np.ndarray, size: int = 28) -> np.ndarray:
    """The iMAML paper pipeline on a raw drawing, inverted: float32 ink in [0, 1]."""
    image = Image.fromarray(drawing).convert("L")  # as Image.open(1-bit png).convert("L")
    resized = image.resize((size, size), resample=Image.Resampling.LANCZOS)
    return (1.0 - np.asarray(resized, dtype=np.float32) / 255.0).astype(np.float32)


def class_fingerprints(ds: FewShotDataset) -> set[bytes]:
    return {ds.images[c].numpy().tobytes() for c in range(ds.num_classes)}


# --- embedded files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHA256))
def test_embedded_arrays_match_published_checksum(name: str) -> None:
    assert hashlib.sha256((EMBEDDED / name).read_bytes()).hexdigest() == SHA256[name]


def test_embedded_license_and_readme() -> None:
    assert "MIT License" in (EMBEDDED / "LICENSE").read_text()
    assert "Brenden Lake" in (EMBEDDED / "LICENSE").read_text()
    readme = (EMBEDDED / "README.md").read_text()
    assert "MIT" in readme and "brendenlake/omniglot" in readme


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared Omniglot copy not present")
def test_embedded_alphabets_equal_shared_copy() -> None:
    for name in ("alphabets.csv", "LICENSE"):
        assert (EMBEDDED / name).read_bytes() == (SHARED / name).read_bytes()


# --- loading and preprocessing ----------------------------------------------------------------


def test_all_characters_shape_dtype_and_order(chars: FewShotDataset) -> None:
    assert chars.images.shape == (1623, 20, 1, 28, 28)
    assert chars.images.dtype == torch.uint8
    assert chars.class_names[0] == "images_background/Arcadian/character01"
    assert chars.class_names[963] == "images_background/Tifinagh/character55"
    assert chars.class_names[964] == "images_evaluation/Angelic/character01"
    assert chars.class_names[1622] == "images_evaluation/ULOG/character26"


@pytest.mark.parametrize(("char", "drawer"), [(0, 0), (500, 7), (963, 19), (964, 3), (1622, 11)])
def test_preprocessing_equals_pil_lanczos_reference(
    chars: FewShotDataset, raw: np.ndarray, char: int, drawer: int
) -> None:
    ours = chars.images[char, drawer, 0].numpy().astype(np.float32) / 255.0
    np.testing.assert_allclose(ours, pil_reference(raw[char, drawer]), rtol=0, atol=1e-6)


def test_ink_is_one(chars: FewShotDataset, raw: np.ndarray) -> None:
    ink_fraction = (~raw[:50]).mean()  # raw False = ink
    ours = chars.images[:50].float().div(255)
    assert ink_fraction < 0.2
    # Resizing roughly preserves the ink mass; an uninverted image would be close to 1 - that.
    assert abs(float(ours.mean()) - ink_fraction) < 0.03
    assert float(ours[..., 0, 0].max()) == 0.0  # corners are background


def test_warm_load_uses_cache(
    cache: Path, chars: FewShotDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sorted(cache.glob("omniglot-*-28px-v1.npz"))
    assert len(files) == 1
    assert not list(cache.glob("*.tmp"))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("warm load must not resize")

    monkeypatch.setattr("implicit_meta.data.omniglot.omniglot_ink_image", fail)
    again = imd.load_omniglot_characters(cache_dir=cache)
    assert torch.equal(again.images, chars.images)
    assert again.class_names == chars.class_names


# --- protocols --------------------------------------------------------------------------------


def test_paper_protocol_follows_documented_permutation(
    paper: imd.Splits[FewShotDataset], name_to_id: dict[str, int]
) -> None:
    perm = np.random.default_rng(0).permutation(1623) + 1  # sorted ids 1..1623, permuted
    train_ids = {base_id(n, name_to_id) for n in paper.train.class_names}
    test_ids = {base_id(n, name_to_id) for n in paper.test.class_names}
    assert train_ids == set(perm[:1200].tolist())
    assert test_ids == set(perm[1200:].tolist())
    assert not train_ids & test_ids
    assert paper.val is None
    # Both splits draw from (nearly) all 50 alphabets.
    assert len({n.split("/")[1] for n in paper.test.class_names}) >= 45


def test_paper_train_has_four_rotations_test_none(paper: imd.Splits[FewShotDataset]) -> None:
    assert paper.train.images.shape == (4800, 20, 1, 28, 28)
    assert paper.test.images.shape == (423, 20, 1, 28, 28)
    suffixes = [n.split("/")[3] if n.count("/") == 3 else "rot0" for n in paper.train.class_names]
    assert {s: suffixes.count(s) for s in set(suffixes)} == {
        "rot0": 1200,
        "rot90": 1200,
        "rot180": 1200,
        "rot270": 1200,
    }
    assert all(n.count("/") == 2 for n in paper.test.class_names)


def test_rotation_classes_are_pil_rotations(
    paper: imd.Splits[FewShotDataset], chars: FewShotDataset
) -> None:
    index = {n: i for i, n in enumerate(paper.train.class_names)}
    transposes = {
        90: Image.Transpose.ROTATE_90,
        180: Image.Transpose.ROTATE_180,
        270: Image.Transpose.ROTATE_270,
    }
    for base in paper.train.class_names[:12:4]:
        source = chars.images[chars.class_names.index(base)]
        for angle, transpose in transposes.items():
            rotated = paper.train.images[index[f"{base}/rot{angle}"]]
            for d in (0, 13):
                expected = np.asarray(Image.fromarray(source[d, 0].numpy()).transpose(transpose))
                assert np.array_equal(rotated[d, 0].numpy(), expected)
        assert torch.equal(paper.train.images[index[base]], source)


def test_test_characters_and_rotations_never_in_train(paper: imd.Splits[FewShotDataset]) -> None:
    # Compare pixels, not names: no whole class of the test split, in any rotation, may appear
    # among the training classes.
    train = class_fingerprints(paper.train)
    for c in range(paper.test.num_classes):
        block = paper.test.images[c].numpy()
        for k in range(4):
            assert np.rot90(block, k, axes=(-2, -1)).tobytes() not in train


def test_lake_protocol_alphabet_split(cache: Path, name_to_id: dict[str, int]) -> None:
    lake = load_omniglot(protocol="lake", rotations=False, cache_dir=cache)
    assert lake.train.num_classes == 964
    assert lake.test.num_classes == 659
    assert {base_id(n, name_to_id) for n in lake.train.class_names} == set(range(1, 965))
    assert {base_id(n, name_to_id) for n in lake.test.class_names} == set(range(965, 1624))
    train_alphabets = {n.split("/")[1] for n in lake.train.class_names}
    test_alphabets = {n.split("/")[1] for n in lake.test.class_names}
    assert len(train_alphabets) == 30 and len(test_alphabets) == 20
    assert not train_alphabets & test_alphabets
    assert not class_fingerprints(lake.train) & class_fingerprints(lake.test)


def test_lake_with_rotations_keeps_test_rotations_out(cache: Path) -> None:
    lake = load_omniglot(protocol="lake", cache_dir=cache)
    assert lake.train.num_classes == 4 * 964
    train = class_fingerprints(lake.train)
    for c in range(0, lake.test.num_classes, 7):
        block = lake.test.images[c].numpy()
        for k in range(4):
            assert np.rot90(block, k, axes=(-2, -1)).tobytes() not in train


def test_validation_carved_from_meta_train(cache: Path, name_to_id: dict[str, int]) -> None:
    splits = load_omniglot(val_classes=100, rotations=False, cache_dir=cache)
    perm = np.random.default_rng(0).permutation(1623) + 1
    assert splits.val is not None
    ids = {
        part: {base_id(n, name_to_id) for n in ds.class_names}
        for part, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test))
    }
    assert ids["val"] == set(perm[1100:1200].tolist())
    assert ids["train"] == set(perm[:1100].tolist())
    assert ids["test"] == set(perm[1200:].tolist())


def test_lake_validation_is_background_only(cache: Path, name_to_id: dict[str, int]) -> None:
    splits = load_omniglot(protocol="lake", val_classes=64, rotations=False, cache_dir=cache)
    assert splits.val is not None
    val_ids = {base_id(n, name_to_id) for n in splits.val.class_names}
    train_ids = {base_id(n, name_to_id) for n in splits.train.class_names}
    expected = set((np.random.default_rng(0).permutation(964)[-64:] + 1).tolist())
    assert val_ids == expected
    assert train_ids == set(range(1, 965)) - expected


def test_rotation_options(cache: Path) -> None:
    splits = load_omniglot(rotations=(0, 180), test_rotations=True, cache_dir=cache)
    assert splits.train.num_classes == 2400
    assert splits.test.num_classes == 4 * 423
    with pytest.raises(ValueError, match="angles"):
        load_omniglot(rotations=(45,), cache_dir=cache)
    with pytest.raises(ValueError, match="protocol"):
        load_omniglot(protocol="vinyals", cache_dir=cache)  # type: ignore[arg-type]


# --- sampling real data -----------------------------------------------------------------------


def test_sampled_omniglot_images_belong_to_their_class(paper: imd.Splits[FewShotDataset]) -> None:
    sampler = EpisodeSampler(paper.train, ways=5, shots=1, queries=5, seed=3, device="cpu")
    batch = sampler.sample(tasks=4)
    assert batch.xs.shape == (4, 5, 1, 28, 28) and batch.xq.shape == (4, 25, 1, 28, 28)
    # Sampled floats are exact multiples of 1/255; map them back to uint8 to compare.
    assert torch.equal(batch.xs * 255, (batch.xs * 255).round())
    for t in range(4):
        for x, y in [
            *zip(batch.xs[t], batch.ys[t], strict=True),
            *zip(batch.xq[t], batch.yq[t], strict=True),
        ]:
            own = paper.train.images[int(batch.classes[t, int(y)])]  # [20, 1, 28, 28]
            pixels = (x * 255).round().to(torch.uint8)
            assert (own == pixels).flatten(1).all(dim=1).any(), "image not found in its class"
