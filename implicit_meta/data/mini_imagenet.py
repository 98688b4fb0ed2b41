"""Mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 splits) from a local copy.

Two on-disk forms are read, per split, and never downloaded:

pickle form
    ``ROOT/mini-imagenet-cache-{train,validation,test}.pkl``: a pickled dict with
    ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (class name -> list of row
    indices). Loaded with :mod:`implicit_meta.data.safe_pickle`, so a crafted file cannot run code.

CSV form
    ``ROOT/{train,val,test}.csv`` with header ``filename,label`` (the Ravi & Larochelle split
    files) and ``ROOT/images/<filename>`` JPEGs. Images are converted to RGB and resized to 84x84
    with PIL LANCZOS when they are not 84x84 already; the result is cached on disk (decoding
    60,000 JPEGs takes minutes).

Classes are ordered by sorted class name (the WordNet id, e.g. ``n01532829``), images within a
class in the order the file lists them. Images are kept as uint8 ``[classes, 600, 3, 84, 84]``
(the 64-class train split is 813 MB); :class:`~implicit_meta.data.EpisodeSampler` converts
draws to float32 in [0, 1]. No mean/std normalisation is applied: do it in the model if wanted.
The standard splits have 64 / 16 / 20 classes of 600 images (checked with ``strict=True``).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from implicit_meta.data._cache import Arrays, cached_arrays, fingerprint_files, hash_bytes
from implicit_meta.data.dataset import FewShotDataset
from implicit_meta.data.safe_pickle import safe_load_path
from implicit_meta.data.splits import Splits

__all__ = [
    "MINI_IMAGENET_CLASSES",
    "MINI_IMAGENET_IMAGES_PER_CLASS",
    "MINI_IMAGENET_SIZE",
    "MiniImageNetNotFoundError",
    "load_mini_imagenet",
    "load_mini_imagenet_split",
]

MiniImageNetSplit = Literal["train", "val", "test"]
MiniImageNetForm = Literal["auto", "pickle", "csv"]

MINI_IMAGENET_CLASSES: dict[str, int] = {"train": 64, "val": 16, "test": 20}
"""Classes per split of the Ravi & Larochelle split."""

MINI_IMAGENET_IMAGES_PER_CLASS = 600
"""Images in every Mini-ImageNet class."""

MINI_IMAGENET_SIZE = 84
"""Height and width of Mini-ImageNet images."""

CACHE_VERSION = 1
"""Bumped whenever CSV-form preprocessing changes."""

_PICKLE_SPLIT_NAME = {"train": "train", "val": "validation", "test": "test"}


class MiniImageNetNotFoundError(FileNotFoundError):
    """The files of a Mini-ImageNet split are missing; the message says which and where from.

    Example:
        >>> issubclass(MiniImageNetNotFoundError, FileNotFoundError)
        True
    """


def _paths(root: Path, split: str) -> tuple[Path, Path, Path]:
    """Return the pickle, CSV and image-folder paths of ``split``."""
    pickle_path = root / f"mini-imagenet-cache-{_PICKLE_SPLIT_NAME[split]}.pkl"
    return pickle_path, root / f"{split}.csv", root / "images"


def _not_found(root: Path, split: str, form: MiniImageNetForm) -> MiniImageNetNotFoundError:
    pickle_path, csv_path, images = _paths(root, split)
    options = []
    if form in ("auto", "pickle"):
        options.append(
            f"  - {pickle_path}\n"
            "    (pickle form: a dict with 'image_data' uint8 [N, 84, 84, 3] and 'class_dict' "
            "{class name: [row indices]}, as distributed by e.g. learn2learn / "
            "MAML++ as mini-imagenet-cache-{train,validation,test}.pkl)"
        )
    if form in ("auto", "csv"):
        options.append(
            f"  - {csv_path} and the folder {images}/\n"
            "    (CSV form: the Ravi & Larochelle 2017 split file, header 'filename,label', from "
            "the twitter/meta-learning-lstm repository, data/miniImagenet/; the folder holds "
            "the JPEGs named in it, cut from the ILSVRC-2012 training set, e.g. with the "
            "mini-imagenet-tools script)"
        )
    joiner = "\nor\n" if len(options) > 1 else "\n"
    return MiniImageNetNotFoundError(
        f"Mini-ImageNet split {split!r} not found under {root}. Expected"
        + (" one of" if len(options) > 1 else "")
        + ":\n"
        + joiner.join(options)
        + "\nimplicit-meta never downloads data; Mini-ImageNet derives from ImageNet, whose "
        "terms of use apply. Place the files there, or pass the folder that holds them as root."
    )


def _from_pickle(path: Path) -> FewShotDataset:
    data = safe_load_path(path)
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise ValueError(f"{path}: expected a dict with keys 'image_data' and 'class_dict'")
    image_data, class_dict = data["image_data"], data["class_dict"]
    if not (
        isinstance(image_data, np.ndarray)
        and image_data.dtype == np.uint8
        and image_data.ndim == 4
        and image_data.shape[3] == 3
    ):
        raise ValueError(f"{path}: 'image_data' must be a uint8 array [N, H, W, 3]")
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(f"{path}: 'class_dict' must be a non-empty dict")
    names = sorted(str(name) for name in class_dict)
    by_name = {str(name): rows for name, rows in class_dict.items()}
    index = [np.asarray(by_name[name], dtype=np.int64).reshape(-1) for name in names]
    counts = {len(rows) for rows in index}
    if len(counts) != 1:
        raise ValueError(f"{path}: classes have different numbers of images: {sorted(counts)}")
    rows = np.stack(index)
    if rows.size and (rows.min() < 0 or rows.max() >= len(image_data)):
        raise ValueError(f"{path}: 'class_dict' indexes rows outside 'image_data'")
    # Gather per class (not per image) into the preallocated [C, P, 3, H, W] layout.
    _, height, width, _ = image_data.shape
    images = np.empty((len(names), rows.shape[1], 3, height, width), dtype=np.uint8)
    for c in range(len(names)):
        images[c] = image_data[rows[c]].transpose(0, 3, 1, 2)
    return FewShotDataset(torch.from_numpy(images), tuple(names))


def _read_csv(path: Path) -> dict[str, list[str]]:
    """Return ``{label: [filenames in file order]}`` from a ``filename,label`` split file."""
    text = path.read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if header != ["filename", "label"]:
        raise ValueError(f"{path}: expected header 'filename,label', got {','.join(header)!r}")
    groups: dict[str, list[str]] = {}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}:{line}: expected 2 fields, got {len(row)}")
        groups.setdefault(row[1].strip(), []).append(row[0].strip())
    if not groups:
        raise ValueError(f"{path}: no images listed")
    return groups


def _decode(path: Path, size: int) -> npt.NDArray[np.uint8]:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), resample=Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _from_csv(
    csv_path: Path,
    image_dir: Path,
    split: str,
    cache_dir: str | os.PathLike[str] | None,
    use_cache: bool,
) -> FewShotDataset:
    groups = _read_csv(csv_path)
    names = sorted(groups)
    counts = {len(groups[n]) for n in names}
    if len(counts) != 1:
        raise ValueError(f"{csv_path}: classes have different numbers of images: {sorted(counts)}")
    files = [image_dir / f for n in names for f in groups[n]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise MiniImageNetNotFoundError(
            f"{len(missing)} image(s) listed in {csv_path} are missing from {image_dir}, "
            f"e.g. {missing[0].name}"
        )
    key = hash_bytes([csv_path.read_bytes(), fingerprint_files(files, image_dir).encode()])
    size = MINI_IMAGENET_SIZE
    per_class = counts.pop()

    def build() -> Arrays:
        images = np.empty((len(names), per_class, 3, size, size), dtype=np.uint8)
        for i, path in enumerate(files):
            images[i // per_class, i % per_class] = _decode(path, size)
        return {"images": images, "class_names": np.asarray(names, dtype=np.str_)}

    def valid(arrays: Arrays) -> bool:
        shape = (len(names), per_class, 3, size, size)
        return "images" in arrays and arrays["images"].shape == shape

    arrays = cached_arrays(
        f"mini-imagenet-{split}-{key[:24]}-{size}px-v{CACHE_VERSION}.npz",
        build,
        directory=cache_dir,
        enabled=use_cache,
        valid=valid,
    )
    return FewShotDataset(torch.from_numpy(arrays["images"].astype(np.uint8)), tuple(names))


def _check_standard(dataset: FewShotDataset, split: str) -> None:
    expected = (
        MINI_IMAGENET_CLASSES[split],
        MINI_IMAGENET_IMAGES_PER_CLASS,
        3,
        MINI_IMAGENET_SIZE,
        MINI_IMAGENET_SIZE,
    )
    if tuple(dataset.images.shape) != expected:
        raise ValueError(
            f"Mini-ImageNet {split!r} has shape {tuple(dataset.images.shape)}, the standard "
            f"split has {expected}"
        )


def load_mini_imagenet_split(
    root: str | os.PathLike[str],
    split: str,
    *,
    form: MiniImageNetForm = "auto",
    strict: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> FewShotDataset:
    """Load one Mini-ImageNet split from a local copy (see the module docstring for the forms).

    Args:
        root: Folder holding the pickles, or the CSVs and ``images/``.
        split: ``"train"``, ``"val"`` (alias ``"validation"``) or ``"test"``.
        form: ``"pickle"``, ``"csv"``, or ``"auto"`` (pickle if present, else CSV).
        strict: Require the standard shape (64/16/20 classes, 600 images, 3x84x84).
        cache_dir: Cache folder for the CSV form (default ``$IMPLICIT_META_CACHE`` or
            ``~/.cache/implicit_meta``).
        use_cache: Read and write the CSV-form cache.

    Returns:
        uint8 images ``[classes, images_per_class, 3, H, W]`` with WordNet ids as class names.

    Raises:
        MiniImageNetNotFoundError: If the split's files are missing (the message lists the
            expected files and where to obtain them).
        ValueError: On an unknown split or form, a malformed file, or (``strict``) a
            non-standard split.
        implicit_meta.data.UnsafePickleError: If the pickle references a forbidden global.

    Example:
        >>> import pickle, shutil, tempfile, numpy as np
        >>> root = tempfile.mkdtemp()  # a tiny copy in the pickle form: 2 classes x 3 images
        >>> for name in ("train", "validation", "test"):
        ...     data = {"image_data": np.zeros((6, 84, 84, 3), np.uint8),
        ...             "class_dict": {f"n0{name}{c}": [3 * c, 3 * c + 1, 3 * c + 2]
        ...                            for c in range(2)}}
        ...     with open(f"{root}/mini-imagenet-cache-{name}.pkl", "wb") as f:
        ...         pickle.dump(data, f)
        >>> test = load_mini_imagenet_split(root, "test", use_cache=False)
        >>> test.num_classes, test.images_per_class  # the real data: (20, 600)
        (2, 3)
        >>> shutil.rmtree(root)
    """
    split = "val" if split == "validation" else split
    if split not in MINI_IMAGENET_CLASSES:
        raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
    if form not in ("auto", "pickle", "csv"):
        raise ValueError(f"unknown form {form!r}; use 'auto', 'pickle' or 'csv'")
    root_path = Path(root).expanduser()
    pickle_path, csv_path, image_dir = _paths(root_path, split)
    if form in ("auto", "pickle") and pickle_path.is_file():
        dataset = _from_pickle(pickle_path)
    elif form in ("auto", "csv") and csv_path.is_file() and image_dir.is_dir():
        dataset = _from_csv(csv_path, image_dir, split, cache_dir, use_cache)
    else:
        raise _not_found(root_path, split, form)
    if strict:
        _check_standard(dataset, split)
    return dataset


def load_mini_imagenet(
    root: str | os.PathLike[str],
    *,
    form: MiniImageNetForm = "auto",
    strict: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> Splits[FewShotDataset]:
    """Load the train, val and test splits of Mini-ImageNet (about 1.3 GB as uint8).

    Args:
        root: Folder holding the pickles, or the CSVs and ``images/``.
        form: ``"pickle"``, ``"csv"``, or ``"auto"`` (per split: pickle if present, else CSV).
        strict: Require the standard 64/16/20 classes of 600 3x84x84 images.
        cache_dir: Cache folder for the CSV form.
        use_cache: Read and write the CSV-form cache.

    Returns:
        The three splits (``val`` is always present).

    Raises:
        MiniImageNetNotFoundError: If a split's files are missing.
        ValueError: On malformed files, or (``strict``) non-standard splits.

    Example:
        >>> import pickle, shutil, tempfile, numpy as np
        >>> root = tempfile.mkdtemp()  # a tiny copy in the pickle form: 2 classes x 3 images
        >>> for name in ("train", "validation", "test"):
        ...     data = {"image_data": np.zeros((6, 84, 84, 3), np.uint8),
        ...             "class_dict": {f"n0{name}{c}": [3 * c, 3 * c + 1, 3 * c + 2]
        ...                            for c in range(2)}}
        ...     with open(f"{root}/mini-imagenet-cache-{name}.pkl", "wb") as f:
        ...         pickle.dump(data, f)
        >>> load_mini_imagenet(root, use_cache=False).val.num_classes
        2
        >>> try:  # strict=True insists on the standard 64/16/20 classes of 600 images
        ...     load_mini_imagenet(root, strict=True, use_cache=False)
        ... except ValueError:
        ...     print("not the standard split")
        not the standard split
        >>> shutil.rmtree(root)
    """

    def one(split: str) -> FewShotDataset:
        return load_mini_imagenet_split(
            root, split, form=form, strict=strict, cache_dir=cache_dir, use_cache=use_cache
        )

    return Splits(train=one("train"), val=one("val"), test=one("test"))
