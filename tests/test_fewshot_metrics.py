from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from implicit_meta.fewshot.metrics import MetricsLog, read_metrics
from implicit_meta.fewshot.plots import plot_curves


def test_metrics_log_appends_json_lines(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "deep" / "metrics.jsonl")
    log.append({"step": 1, "outer_loss": 1.5, "query_accuracy": 0.25})
    log.append({"step": 2, "outer_loss": float("nan"), "query_accuracy": 0.5})
    lines = log.path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert json.loads(lines[1])["outer_loss"] is None  # strict JSON: no NaN literal
    assert read_metrics(log.path)[0] == {"step": 1, "outer_loss": 1.5, "query_accuracy": 0.25}


def test_read_metrics_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "outer_loss": 1.0}\n{"step": 2, "outer_l')
    assert read_metrics(path) == [{"step": 1, "outer_loss": 1.0}]


def test_truncate_after_drops_records_past_the_checkpoint(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.append({"step": step, "outer_loss": float(step)})
    log.truncate_after(3)
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    records = [
        {"step": s, "outer_loss": 1.0 / s, "inner_loss": 0.5 / s, "query_accuracy": 1 - 1.0 / s}
        for s in range(1, 20)
    ]
    path = plot_curves(records, tmp_path / "curves.png", test_accuracy=0.9, title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert plot_curves([], tmp_path / "empty.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "empty.png"]


def test_curves_legends_leave_the_curves_visible_and_start_at_step_zero() -> None:
    from implicit_meta.fewshot.plots import curves_figure

    records: list[dict[str, Any]] = [{"step": 0, "val_accuracy": 0.3}]
    for step in range(10, 110, 10):
        records.append(
            {
                "step": step,
                "outer_loss": 2.0 - step / 100,
                "inner_loss": 1.0,
                "query_accuracy": step / 200,
                "relative_stationarity": 0.05,
                "relative_cg_residual": 0.2,
                "status_share.NONPOSITIVE_CURVATURE": 0.25,
            }
        )
    records.append({"step": 100, "val_accuracy": 0.8})
    figure = curves_figure(records, test_accuracy=0.8, baseline_accuracy=0.4)
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    _loss_axes, acc_axes, diag_axes = figure.axes
    for axes in figure.axes:
        legend = axes.get_legend()
        assert legend is not None
        # No legend box over its plotting area, so no curve is hidden.
        assert not legend.get_window_extent(renderer).overlaps(axes.get_window_extent(renderer))
        assert axes.get_xlim()[0] == 0.0
    labels = [line.get_label() for line in acc_axes.get_lines()]
    assert labels == [
        "train query accuracy", "validation accuracy", "test accuracy", "test, untrained init",
    ]  # fmt: skip
    validation = acc_axes.get_lines()[1]
    assert next(iter(validation.get_xdata())) == 0.0  # the untrained model's point at step 0
    diagnostics = [line.get_label() for line in diag_axes.get_lines()]
    assert len(diagnostics) == 3 and "non-positive curvature" in diagnostics[2]
