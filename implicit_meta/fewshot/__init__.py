"""Few-shot meta-training with iMAML: config, training loop, evaluation, checkpoints, curves.

The pieces behind ``implicit-meta train`` and ``implicit-meta evaluate``, usable from Python.

Example:
    >>> from implicit_meta.fewshot import TrainConfig, confidence_interval
    >>> TrainConfig().ways, TrainConfig().shots
    (5, 5)
    >>> confidence_interval([1.0, 1.0])
    (1.0, 0.0, 0.0)
"""

# First: names the missing "fewshot" extra in one line if its packages are not installed.
from implicit_meta.fewshot import _extra  # noqa: F401
from implicit_meta.fewshot.builders import (
    build_lr_scheduler,
    build_meta_optimizer,
    build_model,
    initial_model,
)
from implicit_meta.fewshot.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from implicit_meta.fewshot.config import (
    DATASETS,
    LR_SCHEDULES,
    PROTOCOLS,
    RESUMABLE_FIELDS,
    TASK_STRATEGIES,
    TrainConfig,
    meta_lr_at,
)
from implicit_meta.fewshot.data import FewShotSplits, load_splits
from implicit_meta.fewshot.device import (
    DeviceUnavailableError,
    available_cpus,
    configure_threads,
    resolve_device,
)
from implicit_meta.fewshot.evaluation import (
    EvaluationResult,
    confidence_interval,
    episode_accuracies,
    evaluate_episodes,
)
from implicit_meta.fewshot.loading import evaluate_checkpoint, load_meta_model
from implicit_meta.fewshot.meta_batch import (
    MetaBatchStats,
    meta_backward_episodes,
    meta_train_step,
)
from implicit_meta.fewshot.metrics import MetricsLog, read_metrics
from implicit_meta.fewshot.plots import plot_curves
from implicit_meta.fewshot.tasks import accuracy, cross_entropy, cross_entropy_and_accuracy
from implicit_meta.fewshot.trainer import (
    CHECKPOINT_NAME,
    CURVES_NAME,
    EVALUATION_NAME,
    METRICS_NAME,
    TrainResult,
    check_config,
    check_resumable,
    check_world_size,
    train,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CURVES_NAME",
    "DATASETS",
    "EVALUATION_NAME",
    "LR_SCHEDULES",
    "METRICS_NAME",
    "PROTOCOLS",
    "RESUMABLE_FIELDS",
    "TASK_STRATEGIES",
    "CheckpointError",
    "DeviceUnavailableError",
    "EvaluationResult",
    "FewShotSplits",
    "MetaBatchStats",
    "MetricsLog",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "available_cpus",
    "build_lr_scheduler",
    "build_meta_optimizer",
    "build_model",
    "check_config",
    "check_resumable",
    "check_world_size",
    "confidence_interval",
    "configure_threads",
    "cross_entropy",
    "cross_entropy_and_accuracy",
    "episode_accuracies",
    "evaluate_checkpoint",
    "evaluate_episodes",
    "initial_model",
    "load_checkpoint",
    "load_meta_model",
    "load_splits",
    "meta_backward_episodes",
    "meta_lr_at",
    "meta_train_step",
    "plot_curves",
    "read_metrics",
    "resolve_device",
    "save_checkpoint",
    "train",
]
