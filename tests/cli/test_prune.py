"""``ckptctl prune`` as cron runs it: real subprocesses, no TTY, real files, local disk and object stores."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptctl.catalog.journal import JOURNAL_NAME, encode_journal
from ckptctl.catalog.scan import scan_run
from ckptctl.example import write_example_run
from ckptctl.retention.plan import execute, plan_prune
from ckptctl.retention.policy import Policy
from ckptctl.storage import Location
from ckptctl.storage.lock import run_lock
from tests.catalog.runs import age_tree
from tests.conftest import Backend, random_payload, run_cli


def digest_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".ckptctl")
    }


def make_run(root: Path, steps: range) -> Path:
    """A run of real-layout units (HF Trainer: weights + trainer_state.json written last), dated in the past."""
    for step in steps:
        unit = root / f"checkpoint-{step}"
        unit.mkdir(parents=True)
        (unit / "model.safetensors").write_bytes(random_payload(2048))
        (unit / "optimizer.pt").write_bytes(random_payload(4096))
        (unit / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    age_tree(root)
    return root


@pytest.fixture
def example(tmp_path: Path) -> Path:
    return write_example_run(tmp_path / "run")


def test_cron_line_deletes_exits_0_and_prints_no_ansi(example: Path) -> None:
    before = digest_tree(example)
    result = run_cli("prune", "--keep-last", "3", str(example))
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout + result.stderr
    remaining = sorted(p.name for p in example.iterdir() if p.is_dir())
    # 300 is HF's best_model_checkpoint, 600 is half-written: both stay; 100 and 200 go.
    assert remaining == ["checkpoint-300", "checkpoint-400", "checkpoint-500", "checkpoint-600"]
    after = digest_tree(example)
    assert after == {
        k: v for k, v in before.items() if not k.startswith(("checkpoint-100/", "checkpoint-200/"))
    }
    assert "deleted checkpoint-100" in result.stderr and "deleted 2 checkpoint(s)" in result.stderr


def test_dry_run_changes_nothing_and_shows_reasons(example: Path) -> None:
    before = digest_tree(example)
    result = run_cli(
        "prune", str(example), "--keep-last", "1", "--keep-best", "2", "--metric", "eval_loss", "--dry-run"
    )
    assert result.returncode == 0
    assert digest_tree(example) == before
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "keep" in rows["300"] and "best#1 eval_loss=1.62" in rows["300"] and "ref:best" in rows["300"]
    assert "best#2 eval_loss=1.66" in rows["400"]
    assert "delete" in rows["100"] and "skip" in rows["600"] and "incomplete" in rows["600"]
    assert "would delete 2 checkpoint(s)" in result.stderr


def test_json_lines_events(example: Path) -> None:
    result = run_cli("prune", str(example), "--keep-last", "2", "--json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("planned") == 6 and kinds.count("deleted") == 2 and kinds[-1] == "summary"
    summary = events[-1]
    assert summary["deleted"] == 2 and summary["freed_bytes"] > 0 and summary["failed"] == 0
    assert {e["path"] for e in events if e["event"] == "deleted"} == {"checkpoint-100", "checkpoint-200"}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "at least one keep rule is needed (--keep-last, --keep-total"),
        (["--keep-last", "0"], 2, "--keep-last must be at least 1"),
        (["--keep-best", "2", "--metric", "bleu"], 2, "say whether higher or lower is better"),
        (["--keep-best", "2", "--metric", "eval_bleu:max"], 7, "has a value for 'eval_bleu'"),
        (["--keep-last", "1", "--max-delete", "2"], 4, "more than --max-delete 2"),
        (["--keep-last", "1", "--max-delete-bytes", "1KB"], 4, "more than --max-delete-bytes"),
        (
            ["--keep-best", "1", "--metric", "loss", "--metric-file", "/nope/metrics.csv"],
            7,
            "metric file /nope",
        ),
    ],
)
def test_refusals_change_nothing(example: Path, args: list[str], code: int, message: str) -> None:
    before = digest_tree(example)
    result = run_cli("prune", str(example), *args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr.splitlines()[0] and "Traceback" not in result.stderr
    assert digest_tree(example) == before


def test_two_runs_in_one_folder_are_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 600, 100))
    restarted = run / "checkpoint-100"
    now = time.time()
    for path in restarted.iterdir():
        os.utime(path, (now - 3600, now - 3600))  # step 100 written after step 500: a new run restarted here
    result = run_cli("prune", str(run), "--keep-last", "2")
    assert result.returncode == 4 and "step order and time order disagree" in result.stderr
    assert len([p for p in run.iterdir() if not p.name.startswith(".")]) == 5


def test_metric_file_csv_sparse_rows_last_wins(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 600, 100))
    (tmp_path / "metrics.csv").write_text(
        "step,train_loss,val_loss\n100,3,\n100,,0.9\n200,,0.5\n300,,0.8\n300,,0.2\n400,,0.7\n500,2,\n"
    )
    result = run_cli(
        "prune",
        str(run),
        "--keep-best",
        "1",
        "--metric",
        "val_loss",
        "--metric-file",
        str(tmp_path / "metrics.csv"),
        "--json",
        "--no-keep-without-metric",
    )
    assert result.returncode == 0, result.stderr
    kept = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert kept == ["checkpoint-300", "checkpoint-500"]  # 300 best (last value 0.2), 500 newest


def test_a_second_prune_on_a_locked_run_exits_6(example: Path) -> None:
    with run_lock(Location.from_url(str(example))):
        result = run_cli("prune", str(example), "--keep-last", "1")
    assert result.returncode == 6 and "locked" in result.stderr
    assert (example / "checkpoint-100").exists()


def test_an_interrupted_prune_is_finished_and_never_reported_complete(example: Path) -> None:
    # What kill -9 leaves after the journal and the marker went: a unit with its data but no marker.
    (example / JOURNAL_NAME).write_bytes(encode_journal(["checkpoint-200"], time.time()))
    (example / "checkpoint-200" / "trainer_state.json").unlink()
    listed = json.loads(run_cli("list", str(example), "--json").stdout)["data"]["units"]
    assert {u["path"]: (u["status"], u["being_deleted"]) for u in listed}["checkpoint-200"] == (
        "incomplete",
        True,
    )
    assert not any(u["being_deleted"] for u in listed if u["path"] != "checkpoint-200")
    result = run_cli("prune", str(example), "--keep-last", "5")
    assert result.returncode == 0, result.stderr
    assert not (example / "checkpoint-200").exists() and not (example / JOURNAL_NAME).exists()
    assert (example / "checkpoint-100").exists()


def test_prune_on_every_backend(backend: Backend, tmp_path: Path) -> None:
    src = make_run(tmp_path / "src", range(100, 900, 100))
    backend.put_tree(src, "run")
    location = backend.location("run")
    policy = Policy.build(keep_last=3)
    with run_lock(location):
        plan = plan_prune(location, policy, settle_seconds=0, check_time_order=False)
        assert [u.step for u in plan.to_delete] == [100, 200, 300, 400, 500]
        result = execute(plan, location, settle_seconds=0)
    assert [u.step for u in result.deleted] == [100, 200, 300, 400, 500] and not result.failed
    left = scan_run(location, settle_seconds=0)
    assert [u.step for u in left.units] == [600, 700, 800]
    assert not location.exists(JOURNAL_NAME)
    with run_lock(location):  # released: it can be taken again
        pass
    for unit in left.units:
        for f in unit.files:
            assert location.read_bytes(f.path) == (src / f.path).read_bytes()


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_cron_on_s3(backend: Backend, tmp_path: Path) -> None:
    src = make_run(tmp_path / "src", range(100, 600, 100))
    url = backend.put_tree(src, "run")
    result = run_cli(
        "prune", url, "--keep-last", "2", "--settle", "0", "--ignore-time-order", *backend.cli_options
    )
    assert result.returncode == 0, result.stderr
    assert sorted(u.step for u in scan_run(backend.location("run"), settle_seconds=0).units) == [400, 500]
    held = backend.location("run")
    with run_lock(held):
        locked = run_cli("prune", url, "--keep-last", "1", "--settle", "0", *backend.cli_options)
    assert locked.returncode == 6


def test_kill_9_at_random_moments_never_loses_a_kept_checkpoint(tmp_path: Path) -> None:
    """50 trials: kill -9 a real prune at a random moment, re-run it, and check the kept set and its bytes."""
    rng = random.Random(1234)
    template = make_run(tmp_path / "template", range(100, 1300, 100))
    expected_kept = {f"checkpoint-{s}" for s in (1000, 1100, 1200)}
    env = dict(os.environ)
    for trial in range(50):
        run = tmp_path / f"trial{trial}"
        subprocess.run(["cp", "-a", str(template), str(run)], check=True)
        kept_before = {k: v for k, v in digest_tree(run).items() if k.split("/")[0] in expected_kept}
        process = subprocess.Popen(
            [sys.executable, "-m", "ckptctl", "prune", str(run), "--keep-last", "3", "--quiet"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        # Whatever the moment: no unit outside the kept set may look complete while half-deleted.
        for unit in scan_run(Location.from_url(str(run)), settle_seconds=0).units:
            if unit.status.value == "complete":
                names = {f.path.split("/", 1)[1] for f in unit.files}
                assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= names, unit.path
        rerun = run_cli("prune", str(run), "--keep-last", "3", "--quiet")
        assert rerun.returncode == 0, (trial, rerun.stderr)
        assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == sorted(expected_kept)
        assert digest_tree(run) == kept_before, trial


def test_incomplete_older_than_cleans_only_old_half_written_saves(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 400, 100))
    (run / "checkpoint-400").mkdir()
    (run / "checkpoint-400" / "model.safetensors").write_bytes(b"half")  # crashed save, two hours old
    (run / "checkpoint-500").mkdir()
    (run / "checkpoint-500" / "model.safetensors").write_bytes(b"half")  # a save being written now
    old = time.time() - 7200
    os.utime(run / "checkpoint-400" / "model.safetensors", (old, old))
    usage = run_cli("prune", str(run), "--incomplete")
    assert usage.returncode == 2 and "--older-than" in usage.stderr
    result = run_cli("prune", str(run), "--incomplete", "--older-than", "1h", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    deleted = [e["path"] for e in events if e["event"] == "deleted"]
    assert deleted == ["checkpoint-400"]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-100",
        "checkpoint-200",
        "checkpoint-300",
        "checkpoint-500",
    ]


def test_missing_run_and_file_as_run_name_the_run(tmp_path: Path) -> None:
    result = run_cli("prune", str(tmp_path / "nope"), "--keep-last", "2")
    assert result.returncode == 3 and result.stderr.startswith(
        f"error: no such file or folder: {tmp_path / 'nope'}\n"
    )
    (tmp_path / "file.pt").write_bytes(b"x")
    result = run_cli("prune", str(tmp_path / "file.pt"), "--keep-last", "2")
    assert result.returncode == 3 and "is a file; expected a folder of checkpoints" in result.stderr
