"""``tier push`` and ``tier pull`` never write where they read and never through a link (issue 15), leave no lock
file (issue 14 item 12), and give pulled files the umask's modes (issue 16). The real CLI; inputs are compared
byte for byte (every entry, hidden ones and links included) afterwards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.cli.test_output_overlap import one_error_line, run_limited
from tests.conftest import Backend, make_backend, run_cli
from tests.snapshots import snapshot
from tests.tiering.test_tier import make_run


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", steps=(100, 200), size=50_000, incomplete=None)


def pushed(run: Path, remote: Path) -> Path:
    (run / "latest").write_text("checkpoint-200")
    result = run_cli("tier", "push", str(run), "--to", str(remote), "--settle", "0")
    assert result.returncode == 0, result.stderr
    return remote


# -- push: the remote must be apart from the run ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("to", "words"),
    [
        ("run", "is the same place as"),  # rewrote every file onto itself (exit 5)
        ("run/sub", "lies inside"),  # the only other copy of what is freed would live inside the run
        (".", "contains"),
        ("alias/sub", "lies inside"),  # through a link to the run
    ],
)
def test_push_refuses_a_remote_that_overlaps_the_run(
    run: Path, tmp_path: Path, to: str, words: str, monkeypatch
) -> None:
    (tmp_path / "alias").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("tier", "push", "run", "--to", to, "--settle", "0", "--keep-local-last", "1")
    assert result.returncode == 2
    assert f"--to {to} {words} RUN run" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before  # nothing uploaded, nothing freed, no lock file left


def test_push_to_a_bucket_is_not_an_overlap_and_leaves_no_lock(run: Path, tmp_path: Path, request) -> None:
    backend: Backend = make_backend("s3", tmp_path, request)
    result = run_cli(
        "tier", "push", str(run), "--to", f"{backend.url}/run", "--settle", "0", *backend.cli_options
    )
    assert result.returncode == 0, result.stderr
    assert not (run / ".ckptctl.lock").exists()


def test_push_never_writes_through_a_lock_link(run: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not a lock")
    (run / ".ckptctl.lock").symlink_to(victim)
    before = snapshot(tmp_path)
    result = run_cli("tier", "push", str(run), "--to", str(tmp_path / "remote"), "--settle", "0")
    assert result.returncode == 4 and "symbolic link" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before  # the remote was never created


def test_push_leaves_no_lock_file(run: Path, tmp_path: Path) -> None:
    before = snapshot(run)
    pushed(run, tmp_path / "remote")
    after = snapshot(run)
    assert after == {**before, "latest": after["latest"]}  # only the pointer this test wrote


# -- pull: DEST must be apart from a local remote ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("dest", "flags", "words"),
    [
        ("remote/restored", ["--step", "100"], "lies inside"),
        ("remote", ["--all"], "is the same place as"),
        (".", ["--all"], "contains"),
        ("remote/checkpoint-100/x", ["--latest"], "lies inside"),
    ],
)
def test_pull_refuses_a_dest_that_overlaps_the_remote(
    run: Path, tmp_path: Path, dest: str, flags: list[str], words: str, monkeypatch
) -> None:
    pushed(run, tmp_path / "remote")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("tier", "pull", "remote", dest, *flags)
    assert result.returncode == 2
    assert f"DEST {dest} {words} the remote run remote" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before


# -- pull: never through a link ---------------------------------------------------------------------------------
def test_pull_never_writes_through_a_partial_folder_link(run: Path, tmp_path: Path) -> None:
    remote = pushed(run, tmp_path / "remote")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_bytes(b"someone else's")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".checkpoint-100.ckptctl-partial").symlink_to(victim)
    before = snapshot(tmp_path)
    result = run_cli("tier", "pull", str(remote), str(out / "checkpoint-100"), "--step", "100")
    assert result.returncode == 4 and "symbolic link" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_pull_refuses_a_foreign_file_where_its_partial_folder_goes(run: Path, tmp_path: Path) -> None:
    remote = pushed(run, tmp_path / "remote")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".checkpoint-100.ckptctl-partial").write_bytes(b"a file, not our folder")
    before = snapshot(tmp_path)
    result = run_cli("tier", "pull", str(remote), str(out / "checkpoint-100"), "--step", "100")
    assert result.returncode == 4 and "is a file, not a partial folder" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_pull_never_writes_through_a_link_inside_its_partial_folder(run: Path, tmp_path: Path) -> None:
    """A partial folder left by a killed pull is resumed; a link planted in it is refused, never written through
    (today the download opens it with "wb" and overwrites the file it points at)."""
    remote = pushed(run, tmp_path / "remote")
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 10)
    out = tmp_path / "out"
    partial = out / ".checkpoint-100.ckptctl-partial"
    partial.mkdir(parents=True)
    (partial / "optimizer.pt").symlink_to(victim)
    before = snapshot(tmp_path)
    result = run_cli("tier", "pull", str(remote), str(out / "checkpoint-100"), "--step", "100", "--jobs", "1")
    assert result.returncode == 4 and "symbolic link" in one_error_line(result.stderr)
    assert victim.read_bytes() == b"precious" * 10
    assert not (out / "checkpoint-100").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")} == {
        k: v for k, v in before.items() if not k.startswith("out/")
    }


def test_pull_resumes_a_partial_folder_of_its_own(run: Path, tmp_path: Path) -> None:
    remote = pushed(run, tmp_path / "remote")
    out = tmp_path / "out"
    partial = out / ".checkpoint-100.ckptctl-partial"
    partial.mkdir(parents=True)
    shutil.copy2(run / "checkpoint-100" / "model.safetensors", partial / "model.safetensors")
    (partial / "optimizer.pt").write_bytes(b"cut short")
    result = run_cli("tier", "pull", str(remote), str(out / "checkpoint-100"), "--step", "100", "--json")
    assert result.returncode == 0, result.stderr
    assert snapshot(out / "checkpoint-100") == snapshot(run / "checkpoint-100")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-100"]


# -- pull: modes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_pulled_files_get_the_mode_recorded_at_push_less_the_umask(
    run: Path, tmp_path: Path, mask: int
) -> None:
    """A checkpoint file comes back with the permission bits it had when pushed (the manifest records them),
    less the puller's umask, as tar gives them to a user: a manifest (remote input) never makes a file writable
    by more people than the user's own files are. Pointer files (no manifest) and folders get what ``open()``
    and ``mkdir`` give under the umask."""
    modes = [0o600, 0o640, 0o644, 0o777, 0o400]
    recorded = {}
    for index, path in enumerate(sorted(p for p in run.rglob("*") if p.is_file())):
        mode = modes[index % len(modes)]
        path.chmod(mode)
        recorded[path.relative_to(run).as_posix()] = mode
    remote = pushed(run, tmp_path / "remote")
    restored = tmp_path / "restored"
    result = run_limited("tier", "pull", str(remote), str(restored), "--all", umask=mask)
    assert result.returncode == 0, result.stderr
    files = [p for p in restored.rglob("*") if p.is_file()]
    assert "latest" in {p.name for p in files} and len(files) == 7
    for path in files:
        rel = path.relative_to(restored).as_posix()
        wanted = 0o666 & ~mask if path.name == "latest" else recorded[rel] & ~mask
        assert path.stat().st_mode & 0o777 == wanted, (rel, oct(path.stat().st_mode), oct(wanted))
    for path in [p for p in restored.rglob("*") if p.is_dir()]:
        assert path.stat().st_mode & 0o777 == 0o777 & ~mask, path


def test_pull_on_a_full_disk_removes_its_partial_folder(run: Path, tmp_path: Path) -> None:
    remote = pushed(run, tmp_path / "remote")
    before = snapshot(remote)
    out = tmp_path / "out"
    out.mkdir()
    result = run_limited("tier", "pull", str(remote), str(out / "c"), "--step", "100", fsize=20_000)
    assert result.returncode == 1
    assert one_error_line(result.stderr).startswith(f"error: no space left while writing {out / 'c'}")
    assert os.listdir(out) == []
    assert snapshot(remote) == before
