"""Mini-ImageNet on small generated copies of both on-disk forms."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from implicit_meta.data import (
    EpisodeSampler,
    MiniImageNetNotFoundError,
    UnsafePickleError,
    load_mini_imagenet,
    load_mini_imagenet_split,
)

CLASSES = {"train": 4, "val": 2, "test": 3}
PER_CLASS = 6
PICKLE_NAME = {"train": "train", "val": "validation", "test": "test"}


def make_pickles(root: Path, seed: int = 0) -> dict[str, dict[str, object]]:
    """Write mini-imagenet-cache-*.pkl files; return the dicts written."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n_cls in CLASSES.items():
        n = n_cls * PER_CLASS
        image_data = rng.integers(0, 256, size=(n, 84, 84, 3), dtype=np.uint8)
        rows = rng.permutation(n)
        # Insertion order deliberately unsorted; indices scattered over image_data.
        names = [f"n0{split}{k}" for k in reversed(range(n_cls))]
        class_dict = {
            name: rows[k * PER_CLASS : (k + 1) * PER_CLASS].tolist() for k, name in enumerate(names)
        }
        data = {"image_data": image_data, "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{PICKLE_NAME[split]}.pkl").write_bytes(
            pickle.dumps(data, protocol=4)
        )
        written[split] = data
    return written


def make_csv_copy(root: Path, seed: int = 1) -> dict[str, list[tuple[str, str]]]:
    """Write {split}.csv files and JPEGs in images/; return the (filename, label) rows."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    written = {}
    for split, n_cls in CLASSES.items():
        rows = []
        for k in range(n_cls):
            label = f"n9{split}{k}"
            for i in range(PER_CLASS):
                rows.append((f"{label}{i:08d}.jpg", label))
        order = rng.permutation(len(rows))
        rows = [rows[i] for i in order]  # classes interleaved in the file
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
        for j, (filename, _) in enumerate(rows):
            # Mix of sizes: most need the 84x84 LANCZOS resize, some are already 84x84.
            size = (84, 84) if j % 3 == 0 else (100 + j % 7, 90)
            smooth = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            image = Image.fromarray(smooth).resize(size, Image.Resampling.BILINEAR)
            image.save(root / "images" / filename, quality=90)
        written[split] = rows
    return written


def csv_reference(root: Path, rows: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
    names = sorted({label for _, label in rows})
    images = np.empty((len(names), PER_CLASS, 3, 84, 84), dtype=np.uint8)
    for c, name in enumerate(names):
        files = [f for f, label in rows if label == name]
        for i, filename in enumerate(files):
            with Image.open(root / "images" / filename) as image:
                rgb = image.convert("RGB")
            if rgb.size != (84, 84):
                rgb = rgb.resize((84, 84), resample=Image.Resampling.LANCZOS)
            images[c, i] = np.asarray(rgb).transpose(2, 0, 1)
    return names, images


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("IMPLICIT_META_CACHE", str(tmp_path_factory.mktemp("cache")))


def test_pickle_form_matches_class_dict(tmp_path: Path) -> None:
    written = make_pickles(tmp_path)
    splits = load_mini_imagenet(tmp_path)
    for split, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        data = written[split]
        class_dict = data["class_dict"]
        assert isinstance(class_dict, dict)
        names = sorted(class_dict)
        assert list(ds.class_names) == names
        assert ds.images.shape == (CLASSES[split], PER_CLASS, 3, 84, 84)
        assert ds.images.dtype == torch.uint8
        image_data = data["image_data"]
        assert isinstance(image_data, np.ndarray)
        for c, name in enumerate(names):
            for i, row in enumerate(class_dict[name]):
                expected = np.moveaxis(image_data[row], -1, 0)  # HWC -> CHW
                assert np.array_equal(ds.images[c, i].numpy(), expected)


def test_csv_form_matches_pil_reference(tmp_path: Path) -> None:
    written = make_csv_copy(tmp_path)
    for split in ("train", "val", "test"):
        ds = load_mini_imagenet_split(tmp_path, split)
        names, expected = csv_reference(tmp_path, written[split])
        assert list(ds.class_names) == names
        assert ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images.numpy(), expected)


def test_csv_form_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_csv_copy(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_mini_imagenet_split(tmp_path / "data", "val", cache_dir=cache)
    assert len(list(cache.glob("mini-imagenet-val-*.npz"))) == 1

    def fail(*args: object) -> None:
        raise AssertionError("must not decode on a warm load")

    monkeypatch.setattr("implicit_meta.data.mini_imagenet._decode", fail)
    again = load_mini_imagenet_split(tmp_path / "data", "validation", cache_dir=cache)
    assert torch.equal(first.images, again.images)
    assert first.class_names == again.class_names


def test_auto_prefers_pickle_and_form_forces(tmp_path: Path) -> None:
    make_pickles(tmp_path)
    make_csv_copy(tmp_path)
    auto = load_mini_imagenet_split(tmp_path, "test")
    assert auto.class_names[0].startswith("n0test")
    forced = load_mini_imagenet_split(tmp_path, "test", form="csv", use_cache=False)
    assert forced.class_names[0].startswith("n9test")


def test_missing_data_error_lists_expected_files(tmp_path: Path) -> None:
    with pytest.raises(MiniImageNetNotFoundError) as info:
        load_mini_imagenet(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for expected in (
        str(tmp_path / "mini-imagenet-cache-train.pkl"),
        str(tmp_path / "train.csv"),
        str(tmp_path / "images"),
        "filename,label",
        "image_data",
        "class_dict",
        "never downloads",
    ):
        assert expected in message
    with pytest.raises(MiniImageNetNotFoundError, match=r"mini-imagenet-cache-validation\.pkl"):
        load_mini_imagenet_split(tmp_path, "val", form="pickle")


def test_missing_image_named(tmp_path: Path) -> None:
    rows = make_csv_copy(tmp_path)
    victim = rows["train"][3][0]
    (tmp_path / "images" / victim).unlink()
    with pytest.raises(MiniImageNetNotFoundError, match=victim):
        load_mini_imagenet_split(tmp_path, "train", use_cache=False)


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    data = {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"a": Evil()}}
    (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(UnsafePickleError):
        load_mini_imagenet_split(tmp_path, "train")
    assert not marker.exists()


def test_strict_checks_standard_shape(tmp_path: Path) -> None:
    make_pickles(tmp_path)
    with pytest.raises(ValueError, match="standard"):
        load_mini_imagenet_split(tmp_path, "train", strict=True)


def test_malformed_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_mini_imagenet_split(tmp_path, "holdout")
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="image_data"):
        load_mini_imagenet_split(tmp_path, "test")
    uneven = {
        "image_data": np.zeros((3, 84, 84, 3), np.uint8),
        "class_dict": {"a": [0], "b": [1, 2]},
    }
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps(uneven))
    with pytest.raises(ValueError, match="different numbers"):
        load_mini_imagenet_split(tmp_path, "test")
    (tmp_path / "images").mkdir()
    (tmp_path / "val.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(ValueError, match="filename,label"):
        load_mini_imagenet_split(tmp_path, "val")


def test_sampler_on_mini_imagenet(tmp_path: Path) -> None:
    written = make_pickles(tmp_path)
    train = load_mini_imagenet_split(tmp_path, "train")
    batch = EpisodeSampler(train, ways=3, shots=2, queries=3, seed=0, device="cpu").sample(2)
    assert batch.xs.shape == (2, 6, 3, 84, 84) and batch.xq.shape == (2, 9, 3, 84, 84)
    assert batch.xs.dtype == torch.float32
    assert float(batch.xs.min()) >= 0.0 and float(batch.xs.max()) <= 1.0
    data = written["train"]
    image_data, class_dict = data["image_data"], data["class_dict"]
    assert isinstance(image_data, np.ndarray) and isinstance(class_dict, dict)
    names = sorted(class_dict)
    for t in range(2):
        for x, y in zip(batch.xs[t], batch.ys[t], strict=True):
            name = names[int(batch.classes[t, int(y)])]
            candidates = np.moveaxis(image_data[class_dict[name]], -1, 1) / np.float32(255)
            assert any(np.array_equal(x.numpy(), cand.astype(np.float32)) for cand in candidates)
