"""``list --chart METRIC``: the metric by step in plain characters, the best and the kept checkpoints marked."""

from __future__ import annotations

import math
from pathlib import Path

from ckptctl.cli._chart import BEST, KEPT, OTHER, Point, metric_chart
from ckptctl.example import write_example_run
from tests.conftest import run_cli


def test_each_point_lands_at_its_step_and_value_with_its_mark() -> None:
    points = [Point(100, 3.0), Point(200, 1.0, BEST), Point(300, 2.0, KEPT), Point(400, math.nan)]
    lines = metric_chart(points, name="eval_loss", width=30, height=5)
    rows = [line.split("|", 1)[1] for line in lines[:5]]
    # Highest value on the top row, lowest on the bottom one; steps from left to right.
    assert rows[0].index(OTHER) == 0 and rows[4].index(BEST) < rows[2].index(KEPT)
    assert lines[0].startswith("3 |") and lines[4].startswith("1 |")
    assert "1 non-finite value(s) not drawn" in lines[-1]


def test_the_best_mark_wins_a_shared_cell() -> None:
    lines = metric_chart([Point(1, 1.0, KEPT), Point(1, 1.0, BEST)], name="m", width=10, height=3)
    assert BEST in lines[0] and KEPT not in "".join(lines[:3])


def test_list_chart_marks_the_best_and_what_the_rules_keep(tmp_path: Path) -> None:
    run = write_example_run(tmp_path / "run")
    (run / ".ckptctl.toml").write_text("keep-last = 1\n")
    result = run_cli("list", str(run), "--chart", "eval_loss")
    assert result.returncode == 0, result.stderr
    drawn = [line for line in result.stdout.splitlines() if "|" in line]
    assert "".join(drawn).count(BEST) == 1
    # keep-last 1 keeps the newest complete checkpoint (and the best, already marked B).
    assert "".join(drawn).count(KEPT) >= 1
    missing = run_cli("list", str(run), "--chart", "nope:min")
    assert missing.returncode == 0 and "no complete checkpoint has a value for 'nope'" in missing.stderr
