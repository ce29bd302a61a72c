"""``survey_runs``: every run under a root, by real trainer layouts, with the leftovers that cost money."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from ckptctl.catalog.runs import RunOrder, RunsSurvey, survey_runs
from ckptctl.errors import NotFoundError, NothingRecognisedError, UsageError
from ckptctl.storage import Location
from ckptctl.tiering.manifest import manifest_rel
from tests.catalog.runs import (
    age_tree,
    deepspeed,
    hf_trainer,
    megatron,
    safetensors_file,
    torch_file,
    torchtitan,
    write,
)
from tests.conftest import Backend, Server
from tests.trainer_fixtures import materialise

SETTLE = 600.0


def _survey(root: Path | str, **kwargs: float) -> RunsSurvey:
    return survey_runs(Location.from_url(str(root)), settle_seconds=SETTLE, **kwargs)


def _by_path(survey: RunsSurvey) -> dict[str, dict]:
    return {run["path"]: run for run in survey.to_dict()["runs"]}


def _sizes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_each_run_of_each_layout_with_nested_lightning_versions(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    hf_trainer(root / "hf")
    deepspeed(root / "ds")
    torchtitan(root / "titan")
    megatron(root / "mega")
    age_tree(root)
    materialise("lightning", root)  # lightning/lightning_logs/version_0 and version_1, real files and times

    survey = _survey(root)
    runs = _by_path(survey)

    assert sorted(runs) == [
        "ds",
        "hf",
        "lightning/lightning_logs/version_0",
        "lightning/lightning_logs/version_1",
        "mega",
        "titan",  # torchtitan's checkpoint/ subfolder is part of the run, not a run of its own
    ]
    status = {path: run["by_status"] for path, run in runs.items()}
    assert status["hf"] == {"complete": 3, "incomplete": 1, "in-progress": 0, "unknown": 0}
    assert status["ds"] == {"complete": 1, "incomplete": 1, "in-progress": 1, "unknown": 0}
    assert status["titan"] == {"complete": 1, "incomplete": 2, "in-progress": 0, "unknown": 0}
    assert status["mega"] == {"complete": 2, "incomplete": 0, "in-progress": 1, "unknown": 0}
    # Single files are not opened by a survey: known by name, status left to `ckptctl list`.
    assert status["lightning/lightning_logs/version_0"]["unknown"] == 4
    assert [runs[p]["layouts"] for p in ("hf", "ds", "titan")] == [["hf-trainer"], ["deepspeed"], ["dcp"]]
    newest = {path: run["newest_step"] for path, run in runs.items()}
    assert newest == {
        "hf": 200,
        "ds": 3,
        "titan": 3,
        "mega": 200,
        "lightning/lightning_logs/version_0": 70,
        "lightning/lightning_logs/version_1": 40,
    }
    assert runs["hf"]["newest_age_seconds"] == pytest.approx(7200, abs=120)
    assert runs["hf"]["bytes"] == _sizes(root / "hf")
    # Its bytes are the whole folder (config.toml too); its checkpoints' bytes are theirs alone.
    assert runs["titan"]["bytes"] == _sizes(root / "titan")
    assert runs["titan"]["checkpoint_bytes"] == _sizes(root / "titan" / "checkpoint")
    totals = survey.totals
    assert totals["runs"] == 6 and totals["checkpoints"] == sum(r["checkpoints"] for r in runs.values())
    assert totals["bytes"] == sum(r["bytes"] for r in runs.values())
    assert json.loads(json.dumps(survey.to_dict())) == survey.to_dict()


def test_leftovers_stale_saves_by_products_and_partial_folders(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    hf_trainer(root / "hf")
    write(root / "hf" / "checkpoint-400-tmp" / "model.safetensors", b"w" * 1000)  # a save that died
    # A pull killed half-way: its partial folder holds a whole checkpoint, which is no run of its own.
    partial = root / "hf" / ".checkpoint-500.ckptctl-partial" / "checkpoint-500"
    safetensors_file(partial / "model.safetensors")
    write(partial / "trainer_state.json", "{}")
    # torchtitan with HF export: DCP shards left beside the consolidated files.
    step = root / "titan" / "checkpoint" / "step-10"
    safetensors_file(step / "model-00001-of-00001.safetensors")
    write(step / "model.safetensors.index.json", "{}")
    write(step / "sharded" / "shard-00001-model-00001-of-00001.safetensors", b"s" * 3000)
    write(step / "sharded" / ".metadata", b"m" * 100)
    # ds_to_universal killed (or --keep_temp_folder): its tmp/ slices beside zero/.
    universal = root / "ds" / "global_step3_universal"
    deepspeed(root / "ds")
    write(universal / "mp_rank_00_model_states.pt")
    write(universal / "zero" / "w" / "fp32.pt", b"z" * 500)
    write(universal / "tmp" / "w" / "0.pt", b"t" * 700)
    age_tree(root)
    write(root / "hf" / "checkpoint-600-tmp" / "model.safetensors")  # still being written: not a leftover

    survey = _survey(root)
    runs = _by_path(survey)

    found = {(item.kind, item.path, item.bytes) for item in survey.leftovers}
    assert found == {
        ("stale-in-progress", "hf/checkpoint-400-tmp", 1000),
        ("partial", "hf/.checkpoint-500.ckptctl-partial", _sizes(partial)),
        ("by-product", "titan/checkpoint/step-10/sharded", 3100),
        ("by-product", "ds/global_step3_universal/tmp", 700),
        ("stale-in-progress", "ds/global_step6", _sizes(root / "ds" / "global_step6")),
    }
    assert sorted(runs) == ["ds", "hf", "titan"]
    assert runs["hf"]["by_status"]["in-progress"] == 2
    # A run's bytes are its checkpoints plus what lies outside them, each byte once.
    hf_bytes = runs["hf"]
    assert hf_bytes["bytes"] == _sizes(root / "hf") == hf_bytes["checkpoint_bytes"] + _sizes(partial)
    assert runs["titan"]["bytes"] == _sizes(root / "titan")
    assert runs["titan"]["leftover_bytes"] == 3100
    assert survey.totals["leftovers"] == 5
    assert survey.totals["bytes"] == _sizes(root)


def test_the_same_survey_on_every_backend(backend: Backend, tmp_path: Path) -> None:
    local = tmp_path / "src"
    for run in ("team/a", "team/b"):
        write(local / run / "checkpoint-100" / "model.safetensors", b"a" * 200)
        write(local / run / "checkpoint-100" / "trainer_state.json", "{}")
    write(local / "team/a/checkpoint-200/model.safetensors", b"a" * 300)  # no trainer_state.json
    write(local / "team/b/checkpoint-300-tmp/model.safetensors", b"b" * 50)
    write(local / "team/b/.checkpoint-100.ckptctl-partial/model.safetensors", b"p" * 70)
    write(local / "team/a" / manifest_rel("checkpoint-100"), "{}")  # a tier push's manifest, counted by name
    write(local / "notes/README.md", "not a run")
    url = backend.put_tree(local, "root")

    # Uploads are dated now on object stores: look from two hours later, past the settle time everywhere.
    survey = survey_runs(
        Location.from_url(url, dict(backend.options)), settle_seconds=SETTLE, now=time.time() + 7200
    )
    runs = _by_path(survey)

    assert sorted(runs) == ["team/a", "team/b"]
    assert runs["team/a"]["by_status"] == {"complete": 1, "incomplete": 1, "in-progress": 0, "unknown": 0}
    assert runs["team/b"]["by_status"] == {"complete": 1, "incomplete": 0, "in-progress": 1, "unknown": 0}
    assert (runs["team/a"]["tiered"], runs["team/b"]["tiered"]) == (1, 0)
    assert (runs["team/a"]["newest_step"], runs["team/b"]["newest_step"]) == (100, 100)
    assert runs["team/a"]["bytes"] == 200 + 2 + 300 + 2  # the manifest is in the run folder too
    assert runs["team/b"]["bytes"] == 200 + 2 + 50 + 70
    assert [(i["kind"], i["path"]) for i in runs["team/b"]["leftovers"]] == [
        ("partial", "team/b/.checkpoint-100.ckptctl-partial"),
        ("stale-in-progress", "team/b/checkpoint-300-tmp"),
    ]
    assert survey.to_dict()["outside_runs"] == []
    ordered = survey.ordered(RunOrder.parse("size:desc"))
    assert [r.path for r in ordered.runs] == ["team/a", "team/b"]


def test_incomplete_multipart_uploads_under_the_root_on_s3(moto_server: Server, tmp_path: Path) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=moto_server.endpoint)
    bucket = f"mpu-{os.getpid()}-{time.monotonic_ns()}"
    fs.mkdir(bucket)
    for run in ("root/a", "root/b"):
        fs.pipe_file(f"{bucket}/{run}/checkpoint-100/model.safetensors", b"x" * 10)
        fs.pipe_file(f"{bucket}/{run}/checkpoint-100/trainer_state.json", b"{}")
    for key in ("root/a/checkpoint-200/model.safetensors", "root/c.safetensors", "elsewhere/x.bin"):
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    assert moto_server.log is not None
    mark = moto_server.log.stat().st_size

    survey = survey_runs(
        Location.from_url(f"s3://{bucket}/root", {"endpoint_url": moto_server.endpoint}), settle_seconds=0
    )

    uploads = {(i.path, i.kind) for i in survey.leftovers}
    assert uploads == {
        ("a/checkpoint-200/model.safetensors", "multipart-upload"),
        ("c.safetensors", "multipart-upload"),
    }
    assert [i.path for i in _run(survey, "a").leftovers] == ["a/checkpoint-200/model.safetensors"]
    assert [i.path for i in survey.outside_runs] == ["c.safetensors"]
    assert survey.totals["multipart_uploads"] == 2
    # The cost promise: listing requests only, no GET or HEAD of any object.
    time.sleep(0.3)
    with moto_server.log.open("rb") as handle:
        handle.seek(mark)
        requests = re.findall(rb'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP', handle.read())
    reads = [target for method, target in requests if b"?" not in target]
    assert requests and reads == []


def _run(survey: RunsSurvey, path: str):
    return next(run for run in survey.runs if run.path == path)


def test_single_file_checkpoints_are_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for run in ("r1", "r2"):
        torch_file(root / run / "step_100.pt")
        (root / run / "step_100.pt").chmod(0)  # an open would fail and warn
    age_tree(root)
    try:
        survey = _survey(root)
    finally:
        for run in ("r1", "r2"):
            (root / run / "step_100.pt").chmod(0o644)
    assert survey.warnings == ()
    assert [(r.path, r.by_status["unknown"], r.newest_step) for r in survey.runs] == [
        ("r1", 1, 100),
        ("r2", 1, 100),
    ]


def test_a_missing_root_and_a_root_without_runs(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        _survey(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NothingRecognisedError):
        _survey(tmp_path / "empty")
    write(tmp_path / "logs-only" / "train.log", "loss=1")
    with pytest.raises(NothingRecognisedError):
        _survey(tmp_path / "logs-only")
    pulled = tmp_path / "partial-only" / ".run.ckptctl-partial" / "checkpoint-1"
    write(pulled / "model.safetensors")
    write(pulled / "trainer_state.json", "{}")
    with pytest.raises(NothingRecognisedError, match="only checkpoints are inside partial folders"):
        _survey(tmp_path / "partial-only")


def test_sort_orders() -> None:
    assert RunOrder.parse("age") == RunOrder("age", False)
    assert RunOrder.parse("checkpoints:desc") == RunOrder("checkpoints", True)
    with pytest.raises(UsageError, match="--sort takes one of size, name, age, checkpoints"):
        RunOrder.parse("bytes")
