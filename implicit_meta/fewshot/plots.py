"""``curves.png``: training loss and query accuracy against meta-steps."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The object-oriented Figure API renders with Agg and never touches pyplot's global backend, so
# plotting works headless and does not change a user's interactive matplotlib session.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_curves"]


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and "step" in record:
            steps.append(float(record["step"]))
            values.append(float(value))
    return steps, values


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    test_accuracy: float | None = None,
    title: str = "",
) -> Path:
    """Plot query loss and accuracy per meta-step from metrics records to a PNG.

    Args:
        records: ``metrics.jsonl`` records with ``step``, ``outer_loss``, ``query_accuracy``.
        path: Output PNG, written atomically (temporary file, then replace).
        test_accuracy: Held-out accuracy to draw as a horizontal line, if known.
        title: Figure title.

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "curves.png"
        >>> plot_curves([{"step": 1, "outer_loss": 1.2, "query_accuracy": 0.4}], out).suffix
        '.png'
    """
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    loss_axes, acc_axes = figure.subplots(1, 2)
    for key, label in (("outer_loss", "query loss"), ("inner_loss", "support loss")):
        steps, values = _series(records, key)
        if steps:
            loss_axes.plot(steps, values, label=label)
    loss_axes.set_xlabel("meta-step")
    loss_axes.set_ylabel("cross-entropy")
    if loss_axes.get_legend_handles_labels()[0]:
        loss_axes.legend(loc="upper right")
    steps, values = _series(records, "query_accuracy")
    acc_axes.plot(steps, values, label="train query accuracy")
    if test_accuracy is not None:
        acc_axes.axhline(test_accuracy, color="tab:red", linestyle="--", label="test accuracy")
    acc_axes.set_xlabel("meta-step")
    acc_axes.set_ylabel("accuracy")
    acc_axes.set_ylim(0.0, 1.0)
    if acc_axes.get_legend_handles_labels()[0]:
        acc_axes.legend(loc="lower right")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, target)
    return target
