"""Few-shot data: Omniglot (embedded), Mini-ImageNet (local copy) and episodic sampling.

Datasets are held in memory as one uint8 tensor ``[classes, images_per_class, C, H, W]``
(:class:`FewShotDataset`); :class:`EpisodeSampler` draws deterministic N-way K-shot meta-batches
from it as float tensors with a leading task dimension (:class:`EpisodeBatch`).

Example:
    >>> from implicit_meta.data import EpisodeSampler, load_omniglot
    >>> splits = load_omniglot()
    >>> sampler = EpisodeSampler(splits.train, 5, 1, 15, seed=0)
    >>> batch = sampler.sample(tasks=32)
"""

from implicit_meta.data._cache import cache_dir
from implicit_meta.data.dataset import FewShotDataset
from implicit_meta.data.episodes import EpisodeBatch
from implicit_meta.data.mini_imagenet import (
    MINI_IMAGENET_CLASSES,
    MINI_IMAGENET_IMAGES_PER_CLASS,
    MINI_IMAGENET_SIZE,
    MiniImageNetNotFoundError,
    MiniImageNetSplits,
    load_mini_imagenet,
    load_mini_imagenet_split,
)
from implicit_meta.data.omniglot import OmniglotSplits, load_omniglot, load_omniglot_characters
from implicit_meta.data.omniglot_meta import (
    NUM_BACKGROUND_CHARACTERS,
    NUM_CHARACTERS,
    OmniglotAlphabet,
    character_name,
    omniglot_alphabets,
)
from implicit_meta.data.preprocess import omniglot_ink_image
from implicit_meta.data.rotations import rotate_classes
from implicit_meta.data.safe_pickle import (
    RestrictedUnpickler,
    UnsafePickleError,
    safe_load,
    safe_load_path,
    safe_loads,
)
from implicit_meta.data.sampler import EpisodeSampler
from implicit_meta.data.splits import (
    PAPER_NUM_TRAIN,
    SPLIT_SEED,
    CharacterSplit,
    OmniglotProtocol,
    omniglot_character_split,
)

__all__ = [
    "MINI_IMAGENET_CLASSES",
    "MINI_IMAGENET_IMAGES_PER_CLASS",
    "MINI_IMAGENET_SIZE",
    "NUM_BACKGROUND_CHARACTERS",
    "NUM_CHARACTERS",
    "PAPER_NUM_TRAIN",
    "SPLIT_SEED",
    "CharacterSplit",
    "EpisodeBatch",
    "EpisodeSampler",
    "FewShotDataset",
    "MiniImageNetNotFoundError",
    "MiniImageNetSplits",
    "OmniglotAlphabet",
    "OmniglotProtocol",
    "OmniglotSplits",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "cache_dir",
    "character_name",
    "load_mini_imagenet",
    "load_mini_imagenet_split",
    "load_omniglot",
    "load_omniglot_characters",
    "omniglot_alphabets",
    "omniglot_character_split",
    "omniglot_ink_image",
    "rotate_classes",
    "safe_load",
    "safe_load_path",
    "safe_loads",
]
