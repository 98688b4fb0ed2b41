"""Checkpoints that survive interruption and load with ``torch.load(weights_only=True)``.

A checkpoint is written to a temporary file in the destination folder, flushed and fsynced, then
moved over the old one with ``os.replace`` (atomic on POSIX and Windows). An interruption at any
point leaves either the old or the new checkpoint, never a torn file. Everything stored is a
tensor or a plain Python value, so loading never needs to unpickle arbitrary objects.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from implicit_meta import __version__
from implicit_meta._atomic import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "decode_json_tensor",
    "encode_json_tensor",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "implicit-meta/fewshot-checkpoint/v2"
"""Value of the ``"format"`` entry; bumped when the layout changes incompatibly.

Files of another format are refused (see :func:`load_checkpoint`). v2 stores the settings
once, as ``config``, and Adam's state as ``outer_optimizer``; v1 also stored the
meta-optimizer's settings, in a second form, under ``meta``.
"""

_FORMAT_PREFIX = "implicit-meta/fewshot-checkpoint/"

_FILE_HINT = "checkpoint.pt or best.pt"

_REQUIRED = (
    "config",
    "image_shape",
    "step",
    "model",
    "outer_optimizer",
    "lr_scheduler",
    "best",
    "world_size",
    "ranks",
)


class CheckpointError(ValueError):
    """A file is not a readable few-shot checkpoint; the message says what is wrong.

    Example:
        >>> issubclass(CheckpointError, ValueError)
        True
    """


def encode_json_tensor(value: Any) -> torch.Tensor:
    """Encode a JSON-serialisable value (e.g. a numpy generator state) as a uint8 tensor.

    numpy bit-generator states hold integers wider than 64 bits; as UTF-8 JSON bytes in a tensor
    they pass ``weights_only`` loading unchanged, whatever the generator.

    Args:
        value: Any value ``json.dumps`` accepts.

    Returns:
        A 1-D uint8 tensor on the CPU.

    Example:
        >>> decode_json_tensor(encode_json_tensor({"state": 2**100}))
        {'state': 1267650600228229401496703205376}
    """
    data = json.dumps(value, sort_keys=True).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_json_tensor(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`encode_json_tensor`.

    Args:
        tensor: A 1-D uint8 tensor.

    Returns:
        The decoded value.

    Raises:
        CheckpointError: If the tensor is not UTF-8 JSON bytes.

    Example:
        >>> decode_json_tensor(encode_json_tensor([1, "a"]))
        [1, 'a']
    """
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise CheckpointError(f"expected a 1-D uint8 tensor, got {tensor.dtype} {tensor.shape}")
    try:
        return json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"corrupt JSON state in checkpoint: {error}") from error


def _canonical(value: Any) -> Any:
    """``value`` rebuilt with interned strings and fresh containers, tensors shared as given.

    pickle writes a repeated object once and refers back to it, so equal states whose strings
    happen to be shared differently (a state built in this process, or one restored from a
    file) pickle to different bytes. Rebuilt this way, equal states give equal files.
    """
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        rebuilt = type(value)((_canonical(k), _canonical(v)) for k, v in value.items())
        # A module's state_dict carries its version metadata as an attribute.
        for name, attribute in getattr(value, "__dict__", {}).items():
            setattr(rebuilt, name, _canonical(attribute))
        return rebuilt
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if type(value) is tuple:
        return tuple(_canonical(v) for v in value)
    return value


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, replace).

    Equal states give byte-identical files, however their objects were built (see
    ``_canonical``), so two runs of the same command can be compared with ``cmp``.

    Args:
        state: Tensors and plain Python values only (what ``weights_only`` loading accepts).
        path: Destination file; its folder is created if needed.

    Returns:
        The destination path.

    Raises:
        OSError: If writing fails; the previous file at ``path`` is then untouched and the
            temporary file removed.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_checkpoint({"step": 1}, pathlib.Path(folder) / "checkpoint.pt").name
        'checkpoint.pt'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        torch.save(_canonical(dict(state)), handle)
    return target


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check its layout.

    Args:
        path: A file written by :func:`save_checkpoint` through the few-shot trainer.
        map_location: Where tensors are loaded.

    Returns:
        The checkpoint dict: ``format``, ``config`` (the run's settings, as
        :meth:`~implicit_meta.fewshot.TrainConfig.to_dict` gives them: their one record),
        ``image_shape``, ``step``, ``model`` (the state dict), and for resuming
        ``outer_optimizer`` (Adam's state dict), ``lr_scheduler``, ``best``, ``world_size``,
        ``ranks`` (each rank's ``sampler``, ``torch_rng`` and ``cuda_rng``; rank 0's are also
        at the top level) and ``versions``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is not a checkpoint, or one of another format (written by
            another version of implicit-meta: the message names it and how to go on).

    Example:
        >>> import tempfile, warnings
        >>> from implicit_meta.fewshot import TrainConfig, train
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> config = TrainConfig.smoke()
        >>> with tempfile.TemporaryDirectory() as out:
        ...     result = train(config, out, progress=False)
        ...     state = load_checkpoint(f"{out}/checkpoint.pt")
        >>> state["step"]
        2
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no checkpoint at {source}")
    # torch's own messages for a foreign file run to several lines of advice (about
    # weights_only) that does not apply; one line saying what the file is not helps more.
    if not zipfile.is_zipfile(source):
        raise CheckpointError(
            f"{source} is not a checkpoint: it is not a file torch.save writes "
            f"(pass the run's {_FILE_HINT})"
        )
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(
            f"{source} is not a readable checkpoint: torch.load(weights_only=True) failed "
            f"with {type(error).__name__}; it is damaged or was not written by implicit-meta"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a checkpoint dict")
    if "format" not in state:
        raise CheckpointError(f"{source} lacks 'format'; is it an implicit-meta checkpoint?")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(_format_message(source, state))
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}; is it an implicit-meta checkpoint?")
    return state


def _format_message(source: Path, state: dict[str, Any]) -> str:
    """Why a checkpoint of another format is refused, and how to go on."""
    found = state["format"]
    if not isinstance(found, str) or not found.startswith(_FORMAT_PREFIX):
        return f"{source} has format {found!r}, not an implicit-meta few-shot checkpoint format"
    versions = state.get("versions")
    writer = versions.get("implicit_meta") if isinstance(versions, dict) else None
    by = f"implicit-meta {writer}" if isinstance(writer, str) else "another implicit-meta"
    load_with = (
        f"implicit-meta=={writer}" if isinstance(writer, str) else "the version that wrote it"
    )
    return (
        f"{source} is a checkpoint of format {found!r}, written by {by}; implicit-meta "
        f"{__version__} reads only {CHECKPOINT_FORMAT!r}. To go on, retrain with this version, "
        f"or load or resume it with {load_with}"
    )
