"""``ckptctl runs ROOT`` as an operator runs it: a real subprocess, no TTY, on local disk and S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.catalog.runs import age_tree, deepspeed, hf_trainer, write
from tests.conftest import Backend, make_backend, run_cli


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Three runs of different sizes: HF Trainer (biggest), DeepSpeed (with a stale save), a small HF one."""
    top = tmp_path / "ckpt"
    hf_trainer(top / "big")
    deepspeed(top / "ds")
    write(top / "small" / "checkpoint-10" / "model.safetensors", b"s" * 10)
    write(top / "small" / "checkpoint-10" / "trainer_state.json", "{}")
    write(top / "small" / ".checkpoint-20.ckptctl-partial" / "model.safetensors", b"p" * 10)
    age_tree(top)
    return top


def _tree(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
    )


def test_table_of_runs_biggest_first_with_leftovers_and_totals(root: Path) -> None:
    before = _tree(root)
    result = run_cli("runs", str(root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["RUN", "LAYOUT", "CKPTS", "COMPLETE"]
    assert [line.split()[0] for line in lines[1:4]] == ["big", "ds", "small"]
    big = lines[1].split()
    assert big[1:6] == ["hf-trainer", "4", "3", "1", "0"]
    leftovers = {line.split()[0]: line for line in lines[5:]}
    assert "stale-in-progress" in leftovers["ds/global_step6"]
    assert "newer than latest" in leftovers["ds/global_step6"]
    assert "partial" in leftovers["small/.checkpoint-20.ckptctl-partial"]
    assert "3 runs, 8 checkpoints (5 complete, 2 incomplete, 1 in progress, 0 unknown)" in result.stderr
    assert "2 leftovers" in result.stderr
    assert "\x1b[" not in result.stdout + result.stderr
    assert _tree(root) == before  # runs only reads


def test_json_envelope_and_sort_orders(root: Path) -> None:
    result = run_cli("runs", str(root), "--json", "--sort", "name")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert (payload["command"], payload["status"], payload["exit_code"], payload["errors"]) == (
        "runs",
        "ok",
        0,
        [],
    )
    data = payload["data"]
    assert set(data) == {"root", "settle_seconds", "runs", "outside_runs", "totals", "warnings"}
    assert [r["path"] for r in data["runs"]] == ["big", "ds", "small"]
    assert data["totals"]["runs"] == 3 and data["totals"]["leftovers"] == 2
    small = data["runs"][2]
    assert small["bytes"] == 10 + 2 + 10 and small["checkpoint_bytes"] == 12 and small["leftover_bytes"] == 10

    def order(*sort: str) -> list[str]:
        done = run_cli("runs", str(root), "--json", *sort)
        assert done.returncode == 0, done.stderr
        return [r["path"] for r in json.loads(done.stdout)["data"]["runs"]]

    assert order() == ["big", "ds", "small"]  # size, biggest first
    assert order("--sort", "size:asc") == ["small", "ds", "big"]
    assert order("--sort", "checkpoints:desc") == ["big", "ds", "small"]
    assert order("--sort", "name:desc") == ["small", "ds", "big"]


def test_a_missing_root_an_empty_one_and_a_bad_sort(tmp_path: Path) -> None:
    missing = run_cli("runs", str(tmp_path / "missing"))
    assert missing.returncode == 3
    assert missing.stderr.splitlines() == [f"error: no such file or folder: {tmp_path / 'missing'}"]
    (tmp_path / "empty").mkdir()
    empty = run_cli("runs", str(tmp_path / "empty"))
    assert empty.returncode == 3
    assert empty.stderr.startswith(f"error: no checkpoints recognised in {tmp_path / 'empty'}")
    assert [line for line in empty.stderr.splitlines() if line.startswith("error:")] == [
        empty.stderr.splitlines()[0]
    ]
    as_json = run_cli("runs", str(tmp_path / "empty"), "--json")
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["errors"][0]["code"] == "nothing_recognised"
    bad = run_cli("runs", str(tmp_path), "--sort", "bytes")
    assert bad.returncode == 2 and "error: --sort takes one of size, name, age, checkpoints" in bad.stderr


def test_on_s3_with_an_incomplete_multipart_upload(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend: Backend = make_backend("s3", tmp_path, request)
    local = tmp_path / "src"
    write(local / "a" / "checkpoint-100" / "model.safetensors", b"a" * 100)
    write(local / "a" / "checkpoint-100" / "trainer_state.json", "{}")
    url = backend.put_tree(local, "root")
    location = backend.location("root")
    bucket = location.root.split("/", 1)[0]
    location.fs.call_s3(
        "create_multipart_upload", Bucket=bucket, Key="root/a/checkpoint-200/model.safetensors"
    )

    result = run_cli("runs", url, "--json", "--settle", "0", *backend.cli_options)
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["data"]["runs"]
    assert run["path"] == "a" and run["by_status"]["complete"] == 1 and run["bytes"] == 102
    (upload,) = run["leftovers"]
    assert (upload["kind"], upload["path"], upload["bytes"]) == (
        "multipart-upload",
        "a/checkpoint-200/model.safetensors",
        None,
    )


def test_a_policy_file_inside_the_trainers_checkpoint_folder_is_the_runs_rule(tmp_path: Path) -> None:
    """runs names a torchtitan run by its folder, but reads rules where prune --each-run does: the
    ``checkpoint/`` folder that holds the checkpoints, so both agree on what the file would free."""
    top = tmp_path / "ckpt"
    for step in (100, 200, 300):
        write(top / "exp" / "checkpoint" / f"step-{step}" / "__0_0.distcp", b"d" * 32)
        write(top / "exp" / "checkpoint" / f"step-{step}" / ".metadata", b"m" * 8)
    write(top / "exp" / "checkpoint" / ".ckptctl.toml", "keep-last = 1\n")
    age_tree(top)
    survey = run_cli("runs", str(top), "--json")
    assert survey.returncode == 0, survey.stderr
    (run,) = json.loads(survey.stdout)["data"]["runs"]
    assert (run["path"], run["checkpoint_folder"]) == ("exp", "exp/checkpoint")
    assert run["policy"]["would_delete"] == 2, run["policy"]
    assert run["policy"]["rules"][0]["from"].endswith("exp/checkpoint/.ckptctl.toml:1")
    plan = run_cli("prune", str(top), "--each-run", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    (planned,) = [e for e in map(json.loads, plan.stdout.splitlines()) if e.get("event") == "run"]
    assert (planned["run"], planned["to_delete"]) == ("exp/checkpoint", ["step-100", "step-200"])
