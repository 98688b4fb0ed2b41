"""The names of the files :func:`~implicit_meta.fewshot.train` writes in a run folder.

Example:
    >>> CHECKPOINT_NAME, BEST_NAME
    ('checkpoint.pt', 'best.pt')
"""

from __future__ import annotations

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "CURVES_NAME",
    "EVALUATION_NAME",
    "METRICS_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
"""The latest checkpoint: written every ``checkpoint_every`` steps and at the end; resumed from."""

BEST_NAME = "best.pt"
"""The checkpoint of the best validation score so far (only with validation)."""

METRICS_NAME = "metrics.jsonl"
"""One JSON record a line: training means every ``log_every`` steps, and validation scores."""

CURVES_NAME = "curves.png"
"""The training (and validation) curves, redrawn at every checkpoint and at the end."""

EVALUATION_NAME = "evaluation.json"
"""The held-out test score of the selected checkpoint and of the untrained baseline."""

CONFIG_NAME = "config.json"
"""The run's settings, as :meth:`~implicit_meta.fewshot.TrainConfig.to_dict` gives them."""
