"""The committed trainer runs match their manifest, and materialise() restores their file times in order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.trainer_fixtures import TRAINER_FIXTURES, check_run, materialise, run_entry, runs

EXPECTED_RUNS = {"accelerate", "hf-trainer", "lightning", "lightning-named", "torch-legacy", "torch-zip"}


def test_every_run_is_recorded() -> None:
    assert set(runs()) == EXPECTED_RUNS
    on_disk = {p.name for p in TRAINER_FIXTURES.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert on_disk == EXPECTED_RUNS


@pytest.mark.parametrize("run", sorted(EXPECTED_RUNS))
def test_manifest_matches_files(run: str) -> None:
    assert check_run(run) == []


@pytest.mark.parametrize("run", sorted(EXPECTED_RUNS))
def test_materialise_keeps_order_and_spacing(run: str, tmp_path: Path) -> None:
    age = 3600.0
    before = time.time()
    root = materialise(run, tmp_path, newest_age_seconds=age)
    after = time.time()
    assert root == tmp_path / run
    entry = run_entry(run)
    recorded = {f["path"]: f["mtime"] for f in entry["files"]}
    got = {p: (root / p).stat().st_mtime_ns / 1e9 for p in recorded}
    newest = max(got.values())
    assert before - age - 0.01 <= newest <= after - age + 0.01
    first = min(recorded, key=lambda p: recorded[p])
    for path, offset in recorded.items():
        assert got[path] - got[first] == pytest.approx(offset - recorded[first], abs=1e-5), path
    assert sorted(recorded, key=lambda p: (recorded[p], p)) == sorted(got, key=lambda p: (got[p], p))
    for d in entry["dirs"]:
        assert (root / d["path"]).stat().st_mtime_ns / 1e9 - got[first] == pytest.approx(d["mtime"], abs=1e-5)
