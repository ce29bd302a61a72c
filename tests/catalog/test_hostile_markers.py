"""Pointer and marker files from other people's runs: never a hang, never unbounded memory, never a
traceback; a bad marker is a defect of its unit and the scan goes on (issue 15)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from ckptctl.catalog.scan import scan_run
from ckptctl.errors import InputTooLargeError, NotARegularFileError
from ckptctl.storage import Location
from ckptctl.storage.location import POINTER_FILE_LIMIT
from tests.catalog.runs import age_tree, safetensors_file, write
from tests.conftest import Backend, run_cli


def deepspeed_run(root: Path) -> Path:
    for step in (10, 20):
        tag = root / f"global_step{step}"
        write(tag / "mp_rank_00_model_states.pt")
        write(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return root


def hf_run(root: Path, steps: tuple[int, ...] = (10, 20, 30)) -> Path:
    for step in steps:
        unit = root / f"checkpoint-{step}"
        safetensors_file(unit / "model.safetensors")
        history = [{"step": s, "eval_loss": 1.0 / s} for s in steps if s <= step]
        write(unit / "trainer_state.json", json.dumps({"global_step": step, "log_history": history}))
    age_tree(root)
    return root


def test_a_fifo_named_latest_does_not_hang_list(tmp_path: Path) -> None:
    run = deepspeed_run(tmp_path / "run")
    os.mkfifo(run / "latest")
    age_tree(run)
    result = run_cli("list", str(run), "--json", timeout=20)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    assert any("latest" in w and "not a regular file" in w for w in data["warnings"])
    assert {u["status"] for u in data["units"]} == {"unknown"}  # nothing confirms the tags


def test_a_huge_sparse_latest_is_not_read_into_memory(tmp_path: Path) -> None:
    run = deepspeed_run(tmp_path / "run")
    with (run / "latest").open("wb") as handle:
        handle.truncate(2 * 1024**3)
    age_tree(run)
    limit = 1024**3  # far below the 2 GiB a whole read would need

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit * 2, limit * 2))

    result = subprocess.run(
        [sys.executable, "-m", "ckptctl", "list", str(run), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=cap,
    )
    assert result.returncode == 0, result.stderr
    warnings = json.loads(result.stdout)["data"]["warnings"]
    assert any("latest" in w and "larger than" in w for w in warnings)


def test_read_bytes_refuses_fifos_links_and_oversized_files(tmp_path: Path) -> None:
    (tmp_path / "outside").write_text("global_step10")
    os.symlink(tmp_path / "outside", tmp_path / "latest")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * (POINTER_FILE_LIMIT + 1))
    location = Location.from_url(str(tmp_path))
    with pytest.raises(NotARegularFileError, match="symbolic link"):
        location.read_bytes("latest")
    with pytest.raises(NotARegularFileError, match="not a regular file"):
        location.read_bytes("fifo")
    with pytest.raises(InputTooLargeError):
        location.read_bytes("big", max_bytes=POINTER_FILE_LIMIT)
    assert location.read_bytes("big") == b"x" * (POINTER_FILE_LIMIT + 1)


def test_remote_reads_are_capped_too(backend: Backend, tmp_path: Path) -> None:
    local = tmp_path / "src"
    write(local / "latest", b"y" * (POINTER_FILE_LIMIT * 3))
    write(local / "small", b"global_step10")
    backend.put_tree(local, "run")
    location = backend.location("run")
    with pytest.raises(InputTooLargeError):
        location.read_bytes("latest", max_bytes=POINTER_FILE_LIMIT)
    assert location.read_bytes("small", max_bytes=POINTER_FILE_LIMIT) == b"global_step10"


@pytest.mark.parametrize(
    "state",
    [
        {"global_step": 30, "log_history": {"not": "a list"}},
        "[" * 100_000 + "]" * 100_000,
        ["not", "an", "object"],
    ],
    ids=["log_history-not-a-list", "deeply-nested", "not-an-object"],
)
def test_a_malformed_trainer_state_is_a_defect_of_its_unit_and_the_scan_goes_on(
    tmp_path: Path, state: object
) -> None:
    run = hf_run(tmp_path / "run")
    text = state if isinstance(state, str) else json.dumps(state)
    (run / "checkpoint-30" / "trainer_state.json").write_text(text)
    age_tree(run)
    for command in (
        ["list", str(run), "--json"],
        ["prune", str(run), "--keep-last", "1", "--dry-run", "--json"],
    ):
        result = run_cli(*command, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    scan = scan_run(Location.from_url(str(run)))
    units = {u.path: u for u in scan.units}
    assert units["checkpoint-30"].status.value == "unknown"
    assert "trainer_state.json" in units["checkpoint-30"].reason
    # The older units still carry their metrics from an older trainer_state.json.
    assert units["checkpoint-20"].metrics["eval_loss"] == pytest.approx(1 / 20)


def test_a_truncated_trainer_state_in_an_older_checkpoint_is_not_kept_in_place_of_a_whole_one(
    tmp_path: Path,
) -> None:
    """Item 14.9: keep-last 2 would keep 30 and 20; 20's marker is cut short, so 10 is kept instead."""
    run = hf_run(tmp_path / "run")
    marker = run / "checkpoint-20" / "trainer_state.json"
    marker.write_bytes(marker.read_bytes()[:25])
    age_tree(run)
    result = run_cli("prune", str(run), "--keep-last", "2", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    planned = {e["path"]: e for e in events if e.get("event") == "planned"}
    assert planned["checkpoint-20"]["action"] == "skip"
    assert planned["checkpoint-10"]["action"] == "keep"
    assert planned["checkpoint-30"]["action"] == "keep"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]


def test_an_empty_trainer_state_is_incomplete_from_the_listing_alone(tmp_path: Path) -> None:
    run = hf_run(tmp_path / "run")
    (run / "checkpoint-10" / "trainer_state.json").write_bytes(b"")
    age_tree(run)
    units = {u.path: u for u in scan_run(Location.from_url(str(run))).units}
    assert units["checkpoint-10"].status.value == "incomplete"
    assert "empty" in units["checkpoint-10"].reason


@pytest.mark.parametrize("name", ["x[/]", "[bold]step_40.pt", "[red]loud[/red]"])
def test_names_with_markup_are_shown_as_they_are(tmp_path: Path, name: str) -> None:
    run = hf_run(tmp_path / "run")
    # A folder holding a step-less weights file, or a stepped file: both are listed, neither is a second run.
    safetensors_file(run / name / "model.safetensors" if name.endswith("]") else run / name)
    age_tree(run)
    for command in (["list", str(run)], ["prune", str(run), "--keep-last", "1", "--dry-run"]):
        result = run_cli(*command, env={**os.environ, "COLUMNS": "250"}, timeout=30)
        assert result.returncode == 0, result.stderr
        assert name in result.stdout
