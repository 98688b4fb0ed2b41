"""Loading the meta-train, validation and meta-test splits a :class:`TrainConfig` names.

The dataset and protocol names a run may ask for are checked here, once, by
:func:`check_dataset`; :class:`~implicit_meta.fewshot.TrainConfig` calls it at construction.
"""

from __future__ import annotations

import functools
from typing import cast

from implicit_meta.data import FewShotDataset, Splits, load_mini_imagenet_split, load_omniglot
from implicit_meta.data.splits import PROTOCOLS, OmniglotProtocol, check_protocol

__all__ = ["DATASETS", "PROTOCOLS", "check_dataset", "load_splits"]

DATASETS = ("omniglot", "mini-imagenet")
"""Datasets :func:`load_splits` (and so :func:`~implicit_meta.fewshot.train`) can load."""


def check_dataset(dataset: str, protocol: str = "paper") -> None:
    """Refuse a dataset name :func:`load_splits` does not know, or an unknown Omniglot protocol.

    The protocol is checked whatever the dataset, so a configuration is valid or not on its own.

    Args:
        dataset: One of :data:`DATASETS`.
        protocol: One of :data:`~implicit_meta.data.splits.PROTOCOLS`.

    Raises:
        ValueError: Naming the field and the accepted values.

    Example:
        >>> check_dataset("omniglot", "lake")
        >>> check_dataset("cifar")
        Traceback (most recent call last):
        ...
        ValueError: dataset must be one of omniglot, mini-imagenet; got 'cifar'
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    check_protocol(protocol)


def load_splits(
    dataset: str,
    root: str | None = None,
    protocol: str = "paper",
    *,
    val_classes: int = 0,
    validation: bool | None = None,
) -> Splits[FewShotDataset]:
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
        The splits, uint8 images on the CPU; ``val`` is None without validation.

    Raises:
        ValueError: On an unknown dataset or protocol (see :func:`check_dataset`), or
            Mini-ImageNet without ``root``.
        FileNotFoundError: If ``root`` lacks the dataset's files.

    Example:
        >>> splits = load_splits("omniglot")
        >>> splits.train.num_classes, splits.test.num_classes, splits.val
        (4800, 423, None)
    """
    check_dataset(dataset, protocol)
    with_val = val_classes > 0 if validation is None else validation
    return _load_splits(dataset, root, protocol, val_classes, with_val)


@functools.lru_cache(maxsize=2)
def _load_splits(
    dataset: str, root: str | None, protocol: str, val_classes: int, validation: bool
) -> Splits[FewShotDataset]:
    if dataset == "omniglot":
        # load_splits ran check_dataset, so the protocol is one of PROTOCOLS.
        omniglot_protocol = cast(OmniglotProtocol, protocol)
        return load_omniglot(root, protocol=omniglot_protocol, val_classes=val_classes)
    if root is None:
        raise ValueError(
            "Mini-ImageNet is not embedded: pass --root pointing to a local copy "
            "(see implicit_meta.data.load_mini_imagenet for the accepted layouts)"
        )
    return Splits(
        train=load_mini_imagenet_split(root, "train"),
        val=load_mini_imagenet_split(root, "val") if validation else None,
        test=load_mini_imagenet_split(root, "test"),
    )
