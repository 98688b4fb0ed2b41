"""Loading the meta-train, validation and meta-test splits a :class:`TrainConfig` names."""

from __future__ import annotations

import functools
from typing import NamedTuple

from implicit_meta.data import FewShotDataset, load_mini_imagenet_split, load_omniglot

__all__ = ["FewShotSplits", "load_splits"]


class FewShotSplits(NamedTuple):
    """Meta-train and meta-test classes of one dataset.

    Attributes:
        train: Classes tasks are meta-trained on.
        test: Held-out classes tasks are evaluated on.
        val: Validation classes for model selection (disjoint from both), or None.

    Example:
        >>> import torch
        >>> from implicit_meta.data import FewShotDataset
        >>> ds = FewShotDataset(torch.zeros(5, 4, 1, 8, 8, dtype=torch.uint8), tuple("abcde"))
        >>> FewShotSplits(train=ds, test=ds).test.num_classes
        5
    """

    train: FewShotDataset
    test: FewShotDataset
    val: FewShotDataset | None = None


def load_splits(
    dataset: str,
    root: str | None = None,
    protocol: str = "paper",
    *,
    val_classes: int = 0,
    validation: bool | None = None,
) -> FewShotSplits:
    """Load the meta-train, meta-test and (optionally) validation splits of a dataset, on the CPU.

    Omniglot is split by ``protocol`` with the 90-degree rotations of meta-train characters as
    extra classes (the MAML/iMAML setting); test and validation characters are not rotated.
    ``val_classes`` characters of the protocol's meta-train set are held out for validation
    (see :func:`implicit_meta.data.splits.omniglot_character_split`). Mini-ImageNet uses the Ravi &
    Larochelle train, validation and test splits from ``root``. The result is memoised per
    process (it is read-only), so repeated runs in one process load the data once.

    Args:
        dataset: ``"omniglot"`` or ``"mini-imagenet"``.
        root: Dataset folder; ``None`` means the embedded Omniglot copy.
        protocol: Omniglot split, ``"paper"`` or ``"lake"``.
        val_classes: Omniglot meta-train characters to hold out for validation.
        validation: Load Mini-ImageNet's validation split (default: when ``val_classes`` > 0).

    Returns:
        The splits, uint8 images on the CPU.

    Raises:
        ValueError: On an unknown dataset, or Mini-ImageNet without ``root``.
        FileNotFoundError: If ``root`` lacks the dataset's files.

    Example:
        >>> splits = load_splits("omniglot")
        >>> splits.train.num_classes, splits.test.num_classes
        (4800, 423)
    """
    with_val = val_classes > 0 if validation is None else validation
    return _load_splits(dataset, root, protocol, val_classes, with_val)


@functools.lru_cache(maxsize=2)
def _load_splits(
    dataset: str, root: str | None, protocol: str, val_classes: int, validation: bool
) -> FewShotSplits:
    if dataset == "omniglot":
        if protocol not in ("paper", "lake"):
            raise ValueError(f"unknown Omniglot protocol {protocol!r}; use 'paper' or 'lake'")
        omniglot = load_omniglot(
            root, protocol="paper" if protocol == "paper" else "lake", val_classes=val_classes
        )
        return FewShotSplits(omniglot.train, omniglot.test, omniglot.val)
    if dataset == "mini-imagenet":
        if root is None:
            raise ValueError(
                "Mini-ImageNet is not embedded: pass --root pointing to a local copy "
                "(see implicit_meta.data.load_mini_imagenet for the accepted layouts)"
            )
        return FewShotSplits(
            load_mini_imagenet_split(root, "train"),
            load_mini_imagenet_split(root, "test"),
            load_mini_imagenet_split(root, "val") if validation else None,
        )
    raise ValueError(f"unknown dataset {dataset!r}; use 'omniglot' or 'mini-imagenet'")
