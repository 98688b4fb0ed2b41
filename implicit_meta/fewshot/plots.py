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

from implicit_meta._atomic import atomic_write

__all__ = ["curves_figure", "plot_curves"]


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and "step" in record:
            steps.append(float(record["step"]))
            values.append(float(value))
    return steps, values


def _diagnostics(axes: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """Plot how far from exact the meta-gradient is.

    Relative stationarity and CG residual, and the share of tasks whose CG met non-positive
    curvature.
    """
    drawn = False
    for key, label in (
        ("relative_stationarity", "inner stationarity / at theta"),
        ("relative_cg_residual", "CG residual / ||b||"),
        ("status_share.NONPOSITIVE_CURVATURE", "share of tasks, non-positive curvature"),
    ):
        steps, values = _series(records, key)
        if steps:
            axes.plot(steps, values, label=label)
            drawn = True
    axes.set_xlabel("meta-step")
    axes.set_ylabel("relative value or share")
    if drawn:
        axes.set_yscale("symlog", linthresh=1e-3)
    axes.set_title("meta-gradient diagnostics", fontsize="medium")


def curves_figure(
    records: Sequence[Mapping[str, Any]],
    *,
    test_accuracy: float | None = None,
    baseline_accuracy: float | None = None,
    title: str = "",
) -> Figure:
    """The figure :func:`plot_curves` saves, for a caller that wants to show or restyle it.

    Args:
        records: ``metrics.jsonl`` records (see :func:`plot_curves`).
        test_accuracy: Held-out accuracy to draw as a horizontal line, if known.
        baseline_accuracy: Held-out accuracy of the untrained initialisation, if known.
        title: Figure title.

    Returns:
        A matplotlib :class:`~matplotlib.figure.Figure` with three panels (losses, accuracies,
        meta-gradient diagnostics), laid out.

    Example:
        >>> figure = curves_figure([{"step": 0, "val_accuracy": 0.3}])
        >>> len(figure.axes)
        3
    """
    figure = Figure(figsize=(15, 4.8))
    FigureCanvasAgg(figure)
    loss_axes, acc_axes, diag_axes = figure.subplots(1, 3)
    for key, label in (("outer_loss", "query loss"), ("inner_loss", "support loss")):
        steps, values = _series(records, key)
        if steps:
            loss_axes.plot(steps, values, label=label)
    loss_axes.set_xlabel("meta-step")
    loss_axes.set_ylabel("cross-entropy")
    steps, values = _series(records, "query_accuracy")
    acc_axes.plot(steps, values, label="train query accuracy")
    steps, values = _series(records, "val_accuracy")
    if steps:
        acc_axes.plot(steps, values, marker="o", markersize=3, label="validation accuracy")
    if test_accuracy is not None:
        acc_axes.axhline(test_accuracy, color="tab:red", linestyle="--", label="test accuracy")
    if baseline_accuracy is not None:
        acc_axes.axhline(
            baseline_accuracy, color="tab:gray", linestyle=":", label="test, untrained init"
        )
    acc_axes.set_xlabel("meta-step")
    acc_axes.set_ylabel("accuracy")
    acc_axes.set_ylim(0.0, 1.0)
    _diagnostics(diag_axes, records)
    for axes in (loss_axes, acc_axes, diag_axes):
        axes.set_xlim(left=0.0)
        if axes.get_legend_handles_labels()[0]:
            # Below the axes: a legend inside would cover the curves it names.
            axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    test_accuracy: float | None = None,
    baseline_accuracy: float | None = None,
    title: str = "",
) -> Path:
    """Plot query loss and accuracy per meta-step from metrics records to a PNG.

    A third panel shows how far from exact the meta-gradient is (relative inner stationarity,
    relative CG residual, share of tasks with non-positive curvature). The accuracy panel shows
    the training query accuracy, the validation accuracy (records
    with ``val_accuracy``, from step 0 on, the untrained model), and, once known, the held-out
    test accuracy of the evaluated checkpoint and of the untrained initialisation as
    horizontal lines: the gap between those two is what meta-learning bought. Legends sit
    outside the plotting area, so they never hide a curve.

    Args:
        records: ``metrics.jsonl`` records with ``step``, ``outer_loss``, ``query_accuracy``
            and, for validation, ``val_accuracy``.
        path: Output PNG, written atomically (temporary file, then replace).
        test_accuracy: Held-out accuracy to draw as a horizontal line, if known.
        baseline_accuracy: Held-out accuracy of the untrained initialisation, if known.
        title: Figure title.

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     out = pathlib.Path(folder) / "curves.png"
        ...     plot_curves([{"step": 1, "outer_loss": 1.2, "query_accuracy": 0.4}], out).suffix
        '.png'
    """
    figure = curves_figure(
        records,
        test_accuracy=test_accuracy,
        baseline_accuracy=baseline_accuracy,
        title=title,
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        figure.savefig(handle, format="png", dpi=100)
    return target
