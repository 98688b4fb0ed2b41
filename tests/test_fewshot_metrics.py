from __future__ import annotations

import json
from pathlib import Path

from implicit_meta.fewshot import MetricsLog, plot_curves, read_metrics


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
