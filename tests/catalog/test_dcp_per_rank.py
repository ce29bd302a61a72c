"""A DCP save made with ``use_collectives=False`` (per-rank ``__R.metadata``, no ``.metadata``) lists as complete
when its ranks are whole, and incomplete when the save was cut: prune --incomplete must never delete a whole one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ckptctl.catalog.scan import scan_run
from ckptctl.storage import Location
from tests.catalog.runs import age_tree

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dcp" / "no-collectives" / "checkpoint"


def _status(tmp_path: Path, cut: str | None = None, blank: str | None = None) -> tuple[str, str]:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / "step-100")
    if cut:
        (run / "step-100" / cut).unlink()
    if blank:
        (run / "step-100" / blank).write_bytes(b"")
    age_tree(run)
    (unit,) = scan_run(Location.from_url(str(run)), settle_seconds=0).units
    return unit.status.value, unit.reason


def test_whole_per_rank_save_is_complete(tmp_path: Path) -> None:
    status, reason = _status(tmp_path)
    assert status == "complete", reason
    assert "ranks 0..1" in reason


@pytest.mark.parametrize(
    ("cut", "blank", "said"),
    [
        ("__1.metadata", None, "rank 1 wrote data but no __N.metadata"),
        ("__0.metadata", None, "rank 0 wrote data but no __N.metadata"),
        (None, "__1.metadata", "__1.metadata is empty"),
    ],
)
def test_cut_per_rank_save_is_incomplete(
    tmp_path: Path, cut: str | None, blank: str | None, said: str
) -> None:
    status, reason = _status(tmp_path, cut, blank)
    assert status == "incomplete"
    assert said in reason


def test_a_gap_in_the_ranks_is_incomplete(tmp_path: Path) -> None:
    """Rank 0 wrote nothing at all: only rank 1's files are there."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / "step-100")
    for name in ("__0.metadata", "__0_0.distcp"):
        (run / "step-100" / name).unlink()
    age_tree(run)
    (unit,) = scan_run(Location.from_url(str(run)), settle_seconds=0).units
    assert unit.status.value == "incomplete"
    assert "no __0.metadata" in unit.reason


def test_inspect_describes_the_merged_ranks_and_names_a_missing_one(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    step = tmp_path / "step-100"
    shutil.copytree(FIXTURE, step)
    run = [sys.executable, "-m", "ckptctl", "inspect", str(step), "--verify", "--json"]
    done = subprocess.run(run, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)["data"]
    assert data["complete"] and data["totals"]["tensors"] == 10
    (step / "__1.metadata").unlink()
    done = subprocess.run(run[:-1], capture_output=True, text=True, check=False)
    assert done.returncode == 8
    assert done.stderr.startswith("error: ") and "a rank's __R.metadata may be missing" in done.stderr
    assert "Traceback" not in done.stderr
