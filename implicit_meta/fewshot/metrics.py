"""``metrics.jsonl``: one JSON object per logged meta-step, appended as training goes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from implicit_meta._atomic import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


def _clean(value: Any) -> Any:
    # JSON has no NaN or infinity; null keeps every line parseable by strict readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read every record of a metrics file; a torn last line (from a crash) is skipped.

    Args:
        path: A ``metrics.jsonl`` file.

    Returns:
        The records in file order; empty if the file does not exist.

    Example:
        >>> read_metrics("/nonexistent/metrics.jsonl")
        []
    """
    source = Path(path)
    if not source.is_file():
        return []
    records: list[dict[str, Any]] = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """Appends records to ``metrics.jsonl``, one line each, flushed at once.

    Args:
        path: The file; created with its folder if needed.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     log = MetricsLog(pathlib.Path(folder) / "metrics.jsonl")
        ...     log.append({"step": 1, "outer_loss": 0.5})
        ...     read_metrics(log.path)
        [{'step': 1, 'outer_loss': 0.5}]
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line.

        Args:
            record: JSON-serialisable values; non-finite floats are written as null.
        """
        line = json.dumps({key: _clean(value) for key, value in record.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` greater than ``step`` (logged after the last checkpoint).

        A resumed run repeats those steps; dropping them keeps one record per step and makes the
        file identical to that of an uninterrupted run. The rewrite is atomic.

        Args:
            step: The checkpoint's step.
        """
        records = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
