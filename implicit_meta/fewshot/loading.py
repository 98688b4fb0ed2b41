"""Rebuilding a meta-trained model from a checkpoint, and evaluating a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from implicit_meta.data import EpisodeSampler
from implicit_meta.fewshot.builders import build_meta_optimizer, build_model, initial_model
from implicit_meta.fewshot.checkpoint import load_checkpoint
from implicit_meta.fewshot.config import TrainConfig
from implicit_meta.fewshot.device import configure_threads, resolve_device
from implicit_meta.fewshot.evaluation import EvaluationResult, evaluate_episodes
from implicit_meta.fewshot.meta_splits import load_splits
from implicit_meta.fewshot.run_files import BEST_NAME, CHECKPOINT_NAME

__all__ = ["evaluate_checkpoint", "load_meta_model", "resolve_checkpoint"]

WHICH: tuple[str, ...] = ("best", "last")
"""The checkpoints of a run folder: ``best.pt`` and ``checkpoint.pt`` (the last)."""


def resolve_checkpoint(path: str | os.PathLike[str], which: str = "best") -> Path:
    """The checkpoint file ``path`` names: itself, or in a run folder the one ``which`` says.

    ``implicit-meta evaluate --checkpoint`` and :func:`load_meta_model` read their argument
    this way, so both take a run folder as well as a file.

    Args:
        path: A ``checkpoint.pt`` or ``best.pt``, or a run folder written by ``train``.
        which: In a run folder: ``"best"`` (``best.pt``, the best validation score; the last
            checkpoint if the run has no validation) or ``"last"`` (``checkpoint.pt``).

    Returns:
        The file to read; a path that is not a folder is returned as given.

    Raises:
        ValueError: If ``which`` is neither ``"best"`` nor ``"last"``.
        FileNotFoundError: If the folder holds no ``checkpoint.pt``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as run:
        ...     _ = (Path(run) / "checkpoint.pt").write_bytes(b"")
        ...     resolve_checkpoint(run).name, resolve_checkpoint(f"{run}/best.pt").name
        ('checkpoint.pt', 'best.pt')
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    given = Path(path)
    if not given.is_dir():
        return given
    best, last = given / BEST_NAME, given / CHECKPOINT_NAME
    if which == "best" and best.is_file():
        return best
    if not last.is_file():
        raise FileNotFoundError(f"{given} holds no {CHECKPOINT_NAME}; is it a run folder?")
    return last


def load_meta_model(
    checkpoint_path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    *,
    which: str = "best",
) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the meta-trained model of a checkpoint, to adapt it to your own tasks.

    The checkpoint is read with ``torch.load(weights_only=True)``; the backbone is rebuilt from
    the stored config and image shape, and the meta-parameters are loaded. To adapt it with the
    settings it was meta-trained with, build the meta-optimizer from the config and call
    :meth:`~implicit_meta.ImplicitMetaOptimizer.adapt` on a support set; classify the query
    images with the adapted copy in train mode (BatchNorm uses the batch statistics, as during
    meta-training).

    Args:
        checkpoint_path: A ``checkpoint.pt`` or ``best.pt`` written by ``implicit-meta train``,
            or the run folder (then ``which`` picks the file, as ``implicit-meta evaluate
            --checkpoint DIR`` does; see :func:`resolve_checkpoint`).
        device: Where to put the model (``"cpu"``, ``"cuda"``; ``"auto"`` also accepted).
        which: In a run folder: ``"best"`` (``best.pt``, or ``checkpoint.pt`` when the run
            had no validation) or ``"last"`` (``checkpoint.pt``).

    Returns:
        ``(model, config)``: the model in train mode on ``device`` (float32), and the run's
        :class:`~implicit_meta.fewshot.TrainConfig` (``config.ways`` is the output size).

    Raises:
        FileNotFoundError: If there is no file at ``checkpoint_path`` (or no checkpoint in the
            folder).
        CheckpointError: If the file is not a readable few-shot checkpoint.
        DeviceUnavailableError: If CUDA is requested but absent.
        ValueError: If ``which`` is neither ``"best"`` nor ``"last"``.

    Example:
        >>> import tempfile, warnings
        >>> from implicit_meta.fewshot import TrainConfig, train
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> config = TrainConfig.smoke(eval_episodes=0)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     _ = train(config, out, progress=False)
        ...     model, config = load_meta_model(out)  # the run folder, or a file in it
        >>> import torch, torch.nn.functional as F
        >>> from implicit_meta.fewshot import build_meta_optimizer
        >>> meta = build_meta_optimizer(model, config)
        >>> loss = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])
        >>> support_images, support_labels = torch.rand(3, 1, 28, 28), torch.arange(3)
        >>> adapted = meta.adapt(loss, (support_images, support_labels))
        >>> adapted(torch.rand(6, 1, 28, 28)).argmax(dim=-1).shape
        torch.Size([6])
    """
    path = resolve_checkpoint(checkpoint_path, which)
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return _load(path, target, initial=False)


def _load(
    checkpoint_path: str | os.PathLike[str], target: torch.device, *, initial: bool
) -> tuple[nn.Module, TrainConfig]:
    """Read a checkpoint once: its meta-trained model (or its untrained start) and config."""
    state = load_checkpoint(checkpoint_path, map_location="cpu")
    config = TrainConfig.from_dict(state["config"])
    channels, height, width = (int(v) for v in state["image_shape"])
    image_shape = (channels, height, width)
    if initial:
        return initial_model(config, image_shape, target), config
    model = build_model(config, image_shape, target)
    model.load_state_dict(state["model"])
    return model, config


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike[str],
    *,
    episodes: int = 600,
    device: str = "auto",
    seed: int | None = None,
    root: str | None = None,
    threads: int = 0,
    progress: bool = False,
    initial: bool = False,
    which: str = "best",
) -> tuple[EvaluationResult, TrainConfig]:
    """Evaluate a checkpoint on test episodes of the dataset it was trained on.

    With ``initial=True`` the model scored is the run's untrained initialisation (rebuilt from
    the checkpoint's seed), adapted the same way on the same episodes: the baseline that shows
    what meta-training added.

    Args:
        checkpoint_path: A ``checkpoint.pt`` or ``best.pt`` written by ``implicit-meta train``,
            or the run folder (see :func:`resolve_checkpoint`).
        episodes: Number of test episodes (600 in the MAML/iMAML protocol).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        seed: Seed of the test episodes; default the run's seed (the episodes the training
            run's final evaluation used).
        root: Dataset folder, if it moved since training (default: the stored one).
        threads: CPU threads for torch (0: see
            :func:`~implicit_meta.fewshot.device.configure_threads`).
        progress: Show a progress bar on stderr.
        initial: Score the untrained initialisation instead of the meta-parameters.
        which: In a run folder: ``"best"`` or ``"last"``, as for :func:`load_meta_model`.

    Returns:
        ``(result, config)``.

    Raises:
        FileNotFoundError: If the checkpoint or the dataset is missing.
        CheckpointError: If the file is not a readable few-shot checkpoint.
        DeviceUnavailableError: If CUDA is requested but absent.
        ValueError: If ``episodes`` is not positive or ``which`` is unknown.

    Example:
        >>> import tempfile, warnings
        >>> from implicit_meta.fewshot import TrainConfig, train
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> config = TrainConfig.smoke(eval_episodes=0)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     _ = train(config, out, progress=False)
        ...     result, _ = evaluate_checkpoint(f"{out}/checkpoint.pt", episodes=3, threads=1)
        >>> result.episodes
        3
    """
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes}")
    path = resolve_checkpoint(checkpoint_path, which)
    target = resolve_device(device)
    configure_threads(threads)
    model, config = _load(path, target, initial=initial)
    meta = build_meta_optimizer(model, config)
    splits = load_splits(config.dataset, root if root is not None else config.root, config.protocol)
    sampler = EpisodeSampler(
        splits.test,
        config.ways,
        config.shots,
        config.queries,
        config.seed if seed is None else seed,
        target,
    )
    return evaluate_episodes(meta, sampler, episodes, progress=progress), config
