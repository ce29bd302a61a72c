"""A metric curve drawn in plain characters (``list --chart``): one column per checkpoint step bucket, the best
and the kept checkpoints marked, readable in a log file as well as on a terminal. Pure: points in, lines out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BEST, KEPT, OTHER = "B", "k", "·"


@dataclass(frozen=True)
class Point:
    step: int
    value: float
    mark: str = OTHER
    """``B`` the best by the metric, ``k`` kept by the run's rules, ``·`` neither."""


def metric_chart(points: Sequence[Point], *, name: str, width: int = 60, height: int = 10) -> list[str]:
    """Rows top (highest value) to bottom, then a step axis; non-finite values are left out and counted.
    Several points in one cell show the most telling mark (best, then kept)."""
    shown = [p for p in points if math.isfinite(p.value)]
    if not shown:
        return [f"{name}: no finite value to draw"]
    low, high = min(p.value for p in shown), max(p.value for p in shown)
    first, last = min(p.step for p in shown), max(p.step for p in shown)
    columns = max(1, min(width, max(24, 4 * len({p.step for p in shown}))))
    grid = [[" "] * columns for _ in range(height)]
    rank = {BEST: 2, KEPT: 1, OTHER: 0}
    for point in sorted(shown, key=lambda p: rank.get(p.mark, 0)):
        x = 0 if last == first else round((point.step - first) / (last - first) * (columns - 1))
        y = 0 if high == low else round((high - point.value) / (high - low) * (height - 1))
        if rank.get(point.mark, 0) >= rank.get(grid[y][x], -1):
            grid[y][x] = point.mark
    label_width = max(len(_number(high)), len(_number(low)))
    lines = []
    for row, cells in enumerate(grid):
        value = high - (high - low) * row / (height - 1) if height > 1 else high
        label = _number(value) if row in (0, height - 1) else ""
        lines.append(f"{label:>{label_width}} |{''.join(cells)}")
    lines.append(" " * label_width + " +" + "-" * columns)
    axis = f"step {first}"
    end = str(last)
    lines.append(" " * (label_width + 2) + axis + " " * max(1, columns - len(axis) - len(end)) + end)
    left_out = len(points) - len(shown)
    legend = f"{name}: {BEST} best, {KEPT} kept by the run's rules, {OTHER} other"
    lines.append(legend + (f"; {left_out} non-finite value(s) not drawn" if left_out else ""))
    return lines


def _number(value: float) -> str:
    return f"{value:.4g}"
