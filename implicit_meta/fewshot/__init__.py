"""Few-shot meta-training with iMAML: config, training loop, evaluation, checkpoints, curves.

The pieces behind ``implicit-meta train`` and ``implicit-meta evaluate``, usable from Python.
This namespace holds what a user calls; the building blocks (file names, choices, schedule,
device and thread helpers, checks) stay importable from their modules:
``implicit_meta.fewshot.config``, ``.checks``, ``.run_files``, ``.checkpoint``, ``.device``,
``.evaluation``, ``.meta_batch``, ``.metrics``, ``.builders``, ``.meta_splits``.

Example:
    >>> from implicit_meta.fewshot import TrainConfig, confidence_interval
    >>> TrainConfig().ways, TrainConfig().shots
    (5, 5)
    >>> confidence_interval([1.0, 1.0])
    (1.0, 0.0, 0.0)
"""

# First: names the missing "fewshot" extra in one line if its packages are not installed.
from implicit_meta.fewshot import _extra  # noqa: F401
from implicit_meta.fewshot.builders import build_meta_optimizer, build_model
from implicit_meta.fewshot.checkpoint import CheckpointError, load_checkpoint
from implicit_meta.fewshot.config import TrainConfig
from implicit_meta.fewshot.device import DeviceUnavailableError
from implicit_meta.fewshot.evaluation import (
    EvaluationResult,
    confidence_interval,
    evaluate_episodes,
)
from implicit_meta.fewshot.loading import evaluate_checkpoint, load_meta_model
from implicit_meta.fewshot.losses import cross_entropy, cross_entropy_and_accuracy
from implicit_meta.fewshot.meta_batch import MetaBatchStats, meta_train_step
from implicit_meta.fewshot.meta_splits import load_splits
from implicit_meta.fewshot.metrics import read_metrics
from implicit_meta.fewshot.plots import plot_curves
from implicit_meta.fewshot.trainer import TrainResult, train

__all__ = [
    "CheckpointError",
    "DeviceUnavailableError",
    "EvaluationResult",
    "MetaBatchStats",
    "TrainConfig",
    "TrainResult",
    "build_meta_optimizer",
    "build_model",
    "confidence_interval",
    "cross_entropy",
    "cross_entropy_and_accuracy",
    "evaluate_checkpoint",
    "evaluate_episodes",
    "load_checkpoint",
    "load_meta_model",
    "load_splits",
    "meta_train_step",
    "plot_curves",
    "read_metrics",
    "train",
]
