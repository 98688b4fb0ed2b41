"""One `Splits` container for every dataset, and one list of dataset and protocol names.

References are independent of the package: the documented numpy permutation and the fixed
background/evaluation id ranges of Omniglot, and the class names written into a tiny fake
Mini-ImageNet folder.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from implicit_meta.data import FewShotDataset, Splits, load_mini_imagenet, load_omniglot
from implicit_meta.data.omniglot_meta import character_name
from implicit_meta.data.splits import PROTOCOLS, omniglot_character_split
from implicit_meta.fewshot import TrainConfig, load_splits
from implicit_meta.fewshot.meta_splits import DATASETS
from tests.test_data_omniglot import shared_cache

MINI_CLASSES = {"train": 4, "val": 2, "test": 3}
PER_CLASS = 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = shared_cache(tmp_path_factory)  # the Omniglot tests' cache: one resize per session
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMPLICIT_META_CACHE", str(path))
        yield path


def fake_mini_imagenet(root: Path) -> None:
    """Write the pickle form with class names ``n0<split><k>``, in unsorted insertion order."""
    pickle_name = {"train": "train", "val": "validation", "test": "test"}
    rng = np.random.default_rng(0)
    for split, count in MINI_CLASSES.items():
        images = rng.integers(0, 256, size=(count * PER_CLASS, 84, 84, 3), dtype=np.uint8)
        class_dict = {
            f"n0{split}{k}": list(range(k * PER_CLASS, (k + 1) * PER_CLASS))
            for k in reversed(range(count))
        }
        data = {"image_data": images, "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{pickle_name[split]}.pkl").write_bytes(pickle.dumps(data))


def assert_disjoint(splits: Splits[FewShotDataset]) -> None:
    parts = [splits.train, splits.test] + ([] if splits.val is None else [splits.val])
    names = [set(part.class_names) for part in parts]
    assert all(len(n) == part.num_classes for n, part in zip(names, parts, strict=True))
    assert sum(len(n) for n in names) == len(set().union(*names))


def reference_ids(protocol: str, val_classes: int) -> tuple[list[int], list[int], list[int]]:
    """Train, val and test character ids, from the documented permutations."""
    rng = np.random.default_rng(0)
    if protocol == "paper":
        order = (rng.permutation(1623) + 1).tolist()
        train, test = order[:1200], order[1200:]
    else:
        train, test = (rng.permutation(964) + 1).tolist(), list(range(965, 1624))
    cut = len(train) - val_classes
    return sorted(train[:cut]), sorted(train[cut:]), sorted(test)


def test_splits_is_frozen_keyword_only_and_val_optional() -> None:
    splits = Splits(train=(1, 2), test=(3,))
    assert splits.val is None
    assert [f.name for f in dataclasses.fields(splits)] == ["train", "val", "test"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        splits.train = (4,)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Splits((1,), (2,))  # type: ignore[call-arg]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_omniglot_character_split_matches_the_documented_permutation(protocol: str) -> None:
    ids = omniglot_character_split(protocol, val_classes=50)  # type: ignore[arg-type]
    train, val, test = reference_ids(protocol, 50)
    assert ids == Splits(train=tuple(train), val=tuple(val), test=tuple(test))
    assert omniglot_character_split(protocol).val is None  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_omniglot_splits_are_one_container_disjoint_in_order(protocol: str, cache: Path) -> None:
    splits = load_omniglot(protocol=protocol, rotations=False, val_classes=50)  # type: ignore[arg-type]
    assert type(splits) is Splits
    assert_disjoint(splits)
    train, val, test = reference_ids(protocol, 50)
    assert splits.val is not None
    for part, ids in ((splits.train, train), (splits.val, val), (splits.test, test)):
        assert part.class_names == tuple(character_name(i) for i in ids)
    # The pipeline's loader hands over the same container, rotations as extra train classes.
    piped = load_splits("omniglot", None, protocol, val_classes=50)
    assert type(piped) is Splits and piped.val is not None
    assert_disjoint(piped)
    assert piped.train.num_classes == 4 * splits.train.num_classes
    assert piped.val.class_names == splits.val.class_names
    assert piped.test.class_names == splits.test.class_names
    assert torch.equal(piped.test.images, splits.test.images)


def test_mini_imagenet_splits_are_one_container_and_disjoint(tmp_path: Path) -> None:
    fake_mini_imagenet(tmp_path)
    splits = load_mini_imagenet(tmp_path, use_cache=False)
    assert type(splits) is Splits
    assert_disjoint(splits)
    assert splits.val is not None
    for split, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        assert part.class_names == tuple(f"n0{split}{k}" for k in range(MINI_CLASSES[split]))
    piped = load_splits("mini-imagenet", str(tmp_path), validation=True)
    assert type(piped) is Splits and piped.val is not None
    for a, b in ((piped.train, splits.train), (piped.val, splits.val), (piped.test, splits.test)):
        assert a.class_names == b.class_names and torch.equal(a.images, b.images)
    assert load_splits("mini-imagenet", str(tmp_path), validation=False).val is None


def test_names_are_refused_with_the_messages_train_config_gives() -> None:
    assert DATASETS == ("omniglot", "mini-imagenet") and PROTOCOLS == ("paper", "lake")
    dataset_message = "dataset must be one of omniglot, mini-imagenet; got 'cifar'"
    protocol_message = "protocol must be one of paper, lake; got 'vinyals'"
    for call, message in (
        (lambda: load_splits("cifar"), dataset_message),
        (lambda: TrainConfig(dataset="cifar"), dataset_message),
        (lambda: load_splits("omniglot", protocol="vinyals"), protocol_message),
        (lambda: TrainConfig(protocol="vinyals"), protocol_message),
        (lambda: load_omniglot(protocol="vinyals"), protocol_message),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message
