"""Metric files for keep-best: JSON Lines or CSV (Lightning's CSVLogger ``metrics.csv``), joined by exact step.

Rows may be sparse (a metric logged on some rows only) and steps may repeat after a restart: the last value
logged for a step wins.
"""

from __future__ import annotations

import csv
import io
import json
import math

from ckptctl.errors import CkptctlError, MetricSourceError
from ckptctl.storage.location import Location


def _number(raw: object) -> float | None:
    if isinstance(raw, bool) or raw is None or raw == "":
        return None
    try:
        return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def parse_metric_file(data: bytes, name: str, metric: str, step_key: str) -> dict[int, float]:
    """``{step: value}`` for ``metric`` from a JSON Lines or CSV file's bytes."""
    text = data.decode("utf-8", errors="replace")
    rows: list[dict[str, object]]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise MetricSourceError(f"{name} line {number} is not JSON: {exc}") from exc
            if isinstance(row, dict):
                rows.append(row)
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    values: dict[int, float] = {}
    for row in rows:
        step, value = _number(row.get(step_key)), _number(row.get(metric))
        if step is not None and value is not None and not math.isnan(step):
            values[int(step)] = value
    return values


def load_metric_file(source: Location, metric: str, step_key: str) -> dict[int, float]:
    """Read a metric file (``source`` is the file itself); a missing or unreadable file is exit 7, naming it."""
    try:
        data = source.read_bytes("")
    except CkptctlError as exc:
        raise MetricSourceError(f"metric file {source.url}: {exc.message}", url=source.url) from exc
    values = parse_metric_file(data, source.url, metric, step_key)
    if not values:
        raise MetricSourceError(
            f"metric file {source.url} has no rows with both {step_key!r} and {metric!r}",
            hint="check --metric and --step-key against the file's columns",
        )
    return values
