"""Locations and trees as users and other people's runs give them: bad --storage-option values, URLs with no
bucket, paths longer than PATH_MAX inside a run — one ``error:`` line or a listing, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptctl.storage import Location
from tests.catalog.runs import age_tree, torch_file
from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "s3://bucket/run", "-o", "client_kwargs=5"], "client_kwargs takes a group"),
        (["list", "s3://bucket/run", "-o", "endpoint_url=5"], "Invalid endpoint: 5"),
        (["inspect", "s3://bucket/run", "-o", "endpoint_url=5"], "Invalid endpoint: 5"),
        (["list", "s3://bucket/run", "-o", "client_kwargs.region_name=5"], "region_name '5'"),
        (["list", "s3://"], "names no bucket"),
        (["prune", "gs://", "--keep-last", "1"], "names no bucket"),
    ],
    ids=[
        "client_kwargs-int",
        "endpoint-int",
        "inspect-endpoint-int",
        "region-int",
        "s3-no-bucket",
        "gs-no-bucket",
    ],
)
def test_bad_store_settings_are_usage_errors(args: list[str], message: str) -> None:
    result = run_cli(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert all(line.startswith(("error:", "hint:")) for line in lines), result.stderr


def _deep_folder(root: Path, levels: int = 25) -> str:
    """A folder chain whose path is far beyond PATH_MAX (4096), made relative to directory descriptors."""
    fd = os.open(root, os.O_RDONLY)
    name = "d" * 200
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("notes.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as handle:
            handle.write("deep")
    finally:
        os.close(fd)
    return "/".join([name] * levels)


def test_a_path_longer_than_path_max_does_not_break_the_walk(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch_file(run / "step_10.pt")
    age_tree(run)
    deep = _deep_folder(run)
    entries = {e.path: e for e in Location.from_url(str(run)).walk()}
    assert f"{deep}/notes.txt" in entries and entries[f"{deep}/notes.txt"].size == 4
    assert len(str(run / deep)) > 4096
    result = run_cli("list", str(run), "--json")
    assert result.returncode == 0, result.stderr
    assert "step_10.pt" in result.stdout


def test_the_walk_reports_links_without_following_them(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "big.bin").write_bytes(b"x" * 100)
    os.symlink(outside, run / "linked-dir")
    os.symlink("checkpoint-10", run / "latest-link")
    entries = {e.path: e for e in Location.from_url(str(run)).walk()}
    assert entries["linked-dir"].type == "link" and entries["linked-dir"].link_target == str(outside)
    assert entries["latest-link"].link_target == "checkpoint-10"
    assert not any(path.startswith("linked-dir/") for path in entries)
