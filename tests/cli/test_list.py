"""``ckptctl list`` as users run it: a real subprocess, no TTY, on local disk and object stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptctl.example import write_example_run
from tests.catalog.runs import age_tree, lightning
from tests.conftest import Backend, run_cli


@pytest.fixture
def example_run(tmp_path: Path) -> Path:
    return write_example_run(tmp_path / "run")


def test_table_shows_every_checkpoint_with_status_metrics_and_pointers(example_run: Path) -> None:
    result = run_cli("list", str(example_run))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["STEP", "STATUS", "SIZE", "AGE", "LAYOUT"]
    row = {line.split()[0]: line for line in lines[1:]}
    assert "complete" in row["300"] and "eval_loss=1.62" in row["300"] and "best" in row["300"]
    assert "incomplete" in row["600"] and "no trainer_state.json" in row["600"]
    assert "\x1b[" not in result.stdout + result.stderr
    assert "6 of 6 checkpoints shown; 5 complete" in result.stderr


def test_json_carries_the_same_data(example_run: Path) -> None:
    result = run_cli("list", str(example_run), "--json")
    assert result.returncode == 0
    payload = json.loads(result.stdout)
    units = payload["data"]["units"]
    assert [u["step"] for u in units] == [100, 200, 300, 400, 500, 600]
    assert [u["status"] for u in units] == ["complete"] * 5 + ["incomplete"]
    assert units[2]["metrics"]["eval_loss"] == pytest.approx(1.62)
    assert units[2]["pointers"] == ["best"]
    assert units[0]["bytes"] == sum(p.stat().st_size for p in (example_run / "checkpoint-100").iterdir())
    summary = payload["data"]["summary"]
    assert summary["bytes"] == sum(u["bytes"] for u in units)
    assert (summary["units"], summary["shown"], summary["complete"], summary["files"]) == (6, 6, 5, 18)
    assert result.stderr == ""


def test_sort_limit_and_status_filters(example_run: Path) -> None:
    result = run_cli(
        "list", str(example_run), "--json", "--sort", "step:desc", "--limit", "2", "--status", "complete"
    )
    assert [u["step"] for u in json.loads(result.stdout)["data"]["units"]] == [500, 400]
    result = run_cli("list", str(example_run), "--json", "--status", "incomplete,in-progress")
    assert [u["step"] for u in json.loads(result.stdout)["data"]["units"]] == [600]
    result = run_cli("list", str(example_run), "--json", "--sort", "size:desc")
    assert json.loads(result.stdout)["data"]["units"][-1]["step"] == 600


def test_settle_makes_fresh_checkpoints_in_progress(tmp_path: Path) -> None:
    run = write_example_run(tmp_path / "run")
    (run / "checkpoint-500" / "trainer_state.json").touch()
    units = json.loads(run_cli("list", str(run), "--json").stdout)["data"]["units"]
    assert units[4]["status"] == "in-progress" and "settling" in units[4]["reason"]
    units = json.loads(run_cli("list", str(run), "--json", "--settle", "0").stdout)["data"]["units"]
    assert units[4]["status"] == "complete"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["list", "/definitely/not/here"], 3, "error: no such file or folder: /definitely/not/here"),
        (["list", "RUN", "--sort", "color"], 2, "error: --sort takes one of"),
        (["list", "RUN", "--settle", "soon"], 2, "error: not a duration: 'soon'"),
        (["list", "RUN", "--status", "great"], 2, "error: --status takes"),
        (["list", "RUN/checkpoint-100/model.safetensors"], 3, "is a file; expected a folder of checkpoints"),
        (["list", "RUN/checkpoint-100/nothing"], 3, "no such file or folder"),
        (["list", "nope://x"], 2, "error:"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(
    example_run: Path, args: list[str], code: int, message: str
) -> None:
    result = run_cli(*[a.replace("RUN", str(example_run)) for a in args])
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith(message) or message in result.stderr.splitlines()[0]
    assert len(result.stderr.splitlines()) <= 2


def test_nothing_recognised_exits_3(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    result = run_cli("list", str(tmp_path))
    assert result.returncode == 3
    assert result.stderr.startswith("error: no checkpoints recognised in")


def test_permission_denied_is_one_line(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads every file; permission errors cannot be provoked")
    run = write_example_run(tmp_path / "run")
    run.chmod(0)
    try:
        result = run_cli("list", str(run))
    finally:
        run.chmod(0o755)
    assert result.returncode == 3 and "permission denied" in result.stderr


@pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
def test_list_on_object_stores(backend: Backend, tmp_path: Path, shared_fixtures: Path) -> None:
    src = tmp_path / "src"
    expected = lightning(src)
    age_tree(src)
    url = backend.put_tree(src, "run")
    result = run_cli("list", url, "--json", "--settle", "0", *backend.cli_options)
    assert result.returncode == 0, result.stderr
    units = json.loads(result.stdout)["data"]["units"]
    assert {u["path"]: u["status"] for u in units} == {p: s for p, (_, _, s) in expected.items()}
    missing = run_cli("list", url.replace("bucket-", "nobucket-"), *backend.cli_options)
    assert missing.returncode == 3
    assert missing.stderr.startswith("error: no such bucket:")
