"""Metric files for keep-best: JSON Lines or CSV (Lightning's CSVLogger ``metrics.csv``), joined by step.

Rows may be sparse (a metric logged on some rows only) and steps may repeat after a restart: the last value
logged for a step wins. A row's step is the checkpoint's step, except in Lightning's logs: Lightning logs
validation (and every epoch-end value) at ``step = global_step - 1`` — its logger step
(``fit_loop.epoch_loop._batches_that_stepped``) is incremented after the validation that runs at the end of
a training batch, while the checkpoint's ``global_step`` (optimizer steps) already counts that batch. So the
row at step 9 holds the validation of the weights in ``epoch=0-step=10.ckpt``: Lightning rows join to
checkpoint step ``row step + 1`` (lightning 2.6, automatic optimization).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass

from ckptctl.errors import CkptctlError, MetricSourceError, literal
from ckptctl.storage.location import Location


def _number(raw: object) -> float | None:
    if isinstance(raw, bool) or raw is None or raw == "":
        return None
    try:
        return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# One field of a metric CSV is a number or a short name; csv's own limit (128 KiB) raises mid-parse.
_CSV_FIELD_LIMIT = 1 << 20
METRIC_FILE_LIMIT = 1 << 30
LIGHTNING_STEP_OFFSET = 1


@dataclass(frozen=True)
class MetricValues:
    """``{checkpoint step: value}`` from a metric file, and how its rows were joined to checkpoints."""

    by_step: dict[int, float]
    step_offset: int
    """Added to a row's step to get the checkpoint's (1 for Lightning's logs, else 0)."""


def _rows_json_lines(text: str, name: str) -> list[dict[str, object]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise MetricSourceError(f"{name} line {number} is nested too deeply to be a metric row") from None
        except ValueError as exc:
            raise MetricSourceError(f"{name} line {number} is not JSON: {exc}") from exc
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _rows_csv(text: str, name: str) -> list[dict[str, object]]:
    limit = csv.field_size_limit()
    try:
        csv.field_size_limit(min(_CSV_FIELD_LIMIT, sys.maxsize))
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [dict(row) for row in reader]
    except csv.Error as exc:
        line = reader.line_num if "reader" in locals() else 0
        raise MetricSourceError(f"{name} line {line} is not CSV: {exc}") from None
    finally:
        csv.field_size_limit(limit)


def parse_metric_file(
    data: bytes, name: str, metric: str, step_key: str, *, step_offset: int = 0
) -> dict[int, float]:
    """``{checkpoint step: value}`` for ``metric`` from a JSON Lines or CSV file's bytes; a row's step plus
    ``step_offset`` is the checkpoint's. Raises MetricSourceError (exit 7) on a file that does not parse."""
    text = data.decode("utf-8", errors="replace")
    rows = (
        _rows_json_lines(text, name)
        if name.endswith((".jsonl", ".json", ".ndjson"))
        else _rows_csv(text, name)
    )
    values: dict[int, float] = {}
    for row in rows:
        step, value = _number(row.get(step_key)), _number(row.get(metric))
        if step is None or value is None or not math.isfinite(step) or step != int(step):
            continue
        values[int(step) + step_offset] = value
    return values


def is_lightning_log(data: bytes, name: str) -> bool:
    """A Lightning CSVLogger ``metrics.csv``: its header has both ``epoch`` and ``step`` columns."""
    if not name.endswith("metrics.csv"):
        return False
    header = data[:4096].decode("utf-8", errors="replace").splitlines()[:1]
    columns = {c.strip() for c in header[0].split(",")} if header else set()
    return {"epoch", "step"} <= columns


def load_metric_file(
    source: Location, metric: str, step_key: str, *, lightning_run: bool = False
) -> MetricValues:
    """Read a metric file (``source`` is the file itself); a missing or unreadable file is exit 7, naming it.
    ``lightning_run``: the checkpoints are Lightning's, so a CSVLogger file is joined by Lightning's rule."""
    try:
        data = source.read_bytes("", max_bytes=METRIC_FILE_LIMIT)
    except CkptctlError as exc:
        raise MetricSourceError(f"metric file {source.url}: {exc.message}", url=source.url) from exc
    offset = LIGHTNING_STEP_OFFSET if lightning_run and is_lightning_log(data, source.url) else 0
    values = parse_metric_file(data, source.url, metric, step_key, step_offset=offset)
    if not values:
        raise MetricSourceError.naming(
            literal(f"metric file {source.url} has no rows with both {step_key!r} and {metric!r}"),
            hint="check {metric} and {step_key} against the file's columns",
        )
    return MetricValues(values, offset)
