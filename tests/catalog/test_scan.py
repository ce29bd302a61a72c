"""The catalog's cross-cutting rules: settle time, pointers, metrics, unknown entries, bad input."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ckptctl.catalog.model import Status
from ckptctl.catalog.scan import scan_run
from ckptctl.errors import NoSuchBucketError, NotADirectoryRunError, NotFoundError, NothingRecognisedError
from ckptctl.example import write_example_run
from ckptctl.storage import Location
from tests.catalog.runs import age_tree, deepspeed, hf_trainer, lightning, megatron, nemo, write
from tests.conftest import Backend


def scan_local(root: Path, **kwargs: float):
    return scan_run(Location.from_url(str(root)), **kwargs)


def test_fresh_unit_is_in_progress_until_it_settles(tmp_path: Path) -> None:
    hf_trainer(tmp_path)
    age_tree(tmp_path)
    fresh = tmp_path / "checkpoint-200" / "trainer_state.json"
    now = time.time()
    os.utime(fresh, (now - 30, now - 30))
    unit = {u.path: u for u in scan_local(tmp_path, settle_seconds=600, now=now).units}["checkpoint-200"]
    assert unit.status is Status.IN_PROGRESS
    assert "settling" in unit.reason
    later = {u.path: u for u in scan_local(tmp_path, settle_seconds=600, now=now + 601).units}[
        "checkpoint-200"
    ]
    assert later.status is Status.COMPLETE


def test_pointers_name_their_units(tmp_path: Path, shared_fixtures: Path) -> None:
    (tmp_path / "ds").mkdir()
    deepspeed(tmp_path / "ds")
    (tmp_path / "mg").mkdir()
    megatron(tmp_path / "mg")
    (tmp_path / "hf").mkdir()
    hf_trainer(tmp_path / "hf")
    (tmp_path / "nemo").mkdir()
    nemo(tmp_path / "nemo")
    age_tree(tmp_path)
    units = {u.path: u for u in scan_local(tmp_path, settle_seconds=0).units}
    assert units["ds/global_step3"].pointers == ("latest",)
    assert units["mg/iter_0000200"].pointers == ("tracker",)
    assert units["hf/checkpoint-200"].pointers == ("best",)
    last = [p for p, u in units.items() if u.pointers == ("last",)]
    assert len(last) == 1 and last[0].endswith("-last")


def test_lightning_last_symlink_is_a_pointer_not_a_unit(tmp_path: Path, shared_fixtures: Path) -> None:
    expected = lightning(tmp_path)
    ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    (ckpts / "last.ckpt").symlink_to("epoch=1-step=200-val_loss=0.9876.ckpt")
    age_tree(tmp_path)
    scan = scan_local(tmp_path, settle_seconds=0)
    assert {u.path for u in scan.units} == set(expected)
    target = next(u for u in scan.units if u.step == 200)
    assert target.pointers == ("last.ckpt",)
    assert target.metrics == {"val_loss": pytest.approx(0.9876)}


def test_latest_naming_a_missing_tag_is_a_warning(tmp_path: Path, shared_fixtures: Path) -> None:
    deepspeed(tmp_path)
    (tmp_path / "latest").write_text("global_step99")
    age_tree(tmp_path)
    scan = scan_local(tmp_path, settle_seconds=0)
    assert any("global_step99" in w for w in scan.warnings)
    assert all(u.status is not Status.COMPLETE for u in scan.units)


def test_hf_metrics_join_by_exact_step(tmp_path: Path) -> None:
    write_example_run(tmp_path / "run")
    scan = scan_local(tmp_path / "run")
    by_step = {u.step: u for u in scan.units}
    assert by_step[300].metrics["eval_loss"] == pytest.approx(1.62)
    assert by_step[300].pointers == ("best",)
    assert by_step[600].status is Status.INCOMPLETE
    assert [u.step for u in scan.units] == [100, 200, 300, 400, 500, 600]


def test_unrecognised_entries_are_unknown_never_guessed(tmp_path: Path) -> None:
    write_example_run(tmp_path / "run")
    write(tmp_path / "run" / "mystery" / "blob.dat")
    write(tmp_path / "run" / "weights.npz")
    units = {u.path: u for u in scan_local(tmp_path / "run").units}
    assert units["mystery"].status is Status.UNKNOWN and units["mystery"].layout.value == "unknown"
    assert units["weights.npz"].status is Status.UNKNOWN
    assert "config.json" not in units


def test_a_checkpoint_folder_given_as_the_run_is_one_unit(tmp_path: Path) -> None:
    write_example_run(tmp_path / "run")
    scan = scan_local(tmp_path / "run" / "checkpoint-300")
    assert len(scan.units) == 1
    assert scan.units[0].status is Status.COMPLETE and scan.units[0].step == 300


def test_nothing_recognised(tmp_path: Path) -> None:
    write(tmp_path / "a" / "b.dat")
    with pytest.raises(NothingRecognisedError, match="no checkpoints recognised"):
        scan_local(tmp_path)
    with pytest.raises(NothingRecognisedError):
        scan_local(_empty(tmp_path / "empty"))


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def test_missing_run_and_file_as_run(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "file.pt")
    backend.put_tree(src, "run")
    with pytest.raises(NotFoundError, match="no such file or folder"):
        scan_run(backend.location("missing"))
    with pytest.raises(NotADirectoryRunError, match="is a file"):
        scan_run(backend.location("run/file.pt"))


@pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
def test_missing_bucket(backend: Backend) -> None:
    location = Location.from_url(backend.url + "-missing/run", dict(backend.options))
    with pytest.raises(NoSuchBucketError, match="no such bucket"):
        scan_run(location)


def test_cut_short_trainer_state_marks_the_unit_incomplete(tmp_path: Path) -> None:
    run = write_example_run(tmp_path / "run")
    state = run / "checkpoint-500" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:100])
    (run / "latest").write_bytes(os.urandom(64))
    age_tree(run)
    scan = scan_local(run)
    by_step = {u.step: u for u in scan.units}
    assert by_step[500].status is Status.INCOMPLETE and "truncated" in by_step[500].reason
    assert by_step[400].status is Status.COMPLETE
    assert by_step[300].metrics["eval_loss"] == pytest.approx(1.62)
    assert any("latest: not a pointer" in w for w in scan.warnings)
