"""Few-shot data: Omniglot (embedded), Mini-ImageNet (local copy) and episodic sampling.

Datasets are held in memory as one uint8 tensor ``[classes, images_per_class, C, H, W]``
(:class:`FewShotDataset`); :class:`EpisodeSampler` draws deterministic N-way K-shot meta-batches
from it as float tensors with a leading task dimension (:class:`EpisodeBatch`). Every loader
returns its meta-train, validation and meta-test classes in one :class:`Splits`.

This namespace holds what a user calls; the building blocks (the Omniglot character splits and
alphabet metadata, image preprocessing, the restricted unpickler, the cache folder, dataset
constants) stay importable from their modules (``implicit_meta.data.splits``,
``.omniglot_meta``, ``.preprocess``, ``.safe_pickle``, ``._cache``, ``.mini_imagenet``).

Example:
    >>> from implicit_meta.data import EpisodeSampler, load_omniglot
    >>> splits = load_omniglot()
    >>> sampler = EpisodeSampler(splits.train, 5, 1, 15, seed=0)
    >>> batch = sampler.sample(tasks=32)
"""

from implicit_meta.data.dataset import FewShotDataset
from implicit_meta.data.mini_imagenet import (
    MiniImageNetNotFoundError,
    load_mini_imagenet,
    load_mini_imagenet_split,
)
from implicit_meta.data.omniglot import load_omniglot, load_omniglot_characters
from implicit_meta.data.rotations import rotate_classes
from implicit_meta.data.safe_pickle import UnsafePickleError
from implicit_meta.data.sampler import EpisodeBatch, EpisodeSampler
from implicit_meta.data.splits import Splits

__all__ = [
    "EpisodeBatch",
    "EpisodeSampler",
    "FewShotDataset",
    "MiniImageNetNotFoundError",
    "Splits",
    "UnsafePickleError",
    "load_mini_imagenet",
    "load_mini_imagenet_split",
    "load_omniglot",
    "load_omniglot_characters",
    "rotate_classes",
]
