"""Issue 18: a run's own files (config.json, tokenizer files, eval.jsonl, logs/) go up with ``tier push`` and come
back with ``tier pull --all``, after the checkpoints, verified; on local folders, memory://, S3 (moto) and GCS
(emulator). Bytes are compared with the run itself, never with what ckptctl says about it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptctl.catalog.journal import encode_journal
from ckptctl.storage import Location
from ckptctl.tiering import run_files
from ckptctl.tiering.manifest import RUN_FILES_MANIFEST, Manifest, check_manifest, remote_view
from ckptctl.tiering.pull import pull, pull_run
from ckptctl.tiering.push import PushOptions, push
from ckptctl.tiering.status import run_status
from tests.conftest import Backend, random_payload, run_cli
from tests.tiering.test_tier import make_run, tree

RUN_FILES = ("config.json", "eval.jsonl", "logs/train.log", "tokenizer.json")
OPTIONS = PushOptions(settle_seconds=0, jobs=3)


def make_run_with_files(root: Path) -> Path:
    """Two HF checkpoints plus the files a training run keeps beside them, all dated an hour ago."""
    make_run(root, steps=(100, 200), size=40_000, incomplete=None)
    (root / "config.json").write_text(json.dumps({"hidden_size": 64, "num_layers": 2}))
    (root / "tokenizer.json").write_bytes(random_payload(20_000))
    (root / "eval.jsonl").write_text('{"step": 100, "loss": 2.5}\n{"step": 200, "loss": 2.1}\n')
    (root / "logs").mkdir()
    (root / "logs" / "train.log").write_text("step 100 loss 2.5\nstep 200 loss 2.1\n")
    old = time.time() - 3000
    for name in RUN_FILES:
        os.utime(root / name, (old, old))
    return root


def run_files_of(remote: Location) -> list[str]:
    view = remote_view(remote)
    assert view.bad_run_files is None
    return [f.path for f in view.run_files.files] if view.run_files else []


def test_run_files_go_up_with_the_run_and_come_back_with_pull_all(backend: Backend, tmp_path: Path) -> None:
    run = make_run_with_files(tmp_path / "run")
    local, remote = Location.from_url(str(run)), backend.location("remote")
    if backend.name == "s3":  # what a push killed while it sent a run file leaves: aborted by the next one
        bucket = backend.url.removeprefix("s3://")
        remote.fs.call_s3("create_multipart_upload", Bucket=bucket, Key="remote/logs/train.log")

    first = push(local, remote, OPTIONS)

    assert sorted(p for p, _ in first.run_files.sent) == sorted(RUN_FILES)
    if backend.name == "s3":
        assert first.aborted_uploads == 1
        assert not remote.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    assert run_files_of(remote) == sorted(RUN_FILES)
    # Named so that nothing takes it for a checkpoint's manifest.
    assert not RUN_FILES_MANIFEST.endswith(".json") and set(remote_view(remote).manifests) == {
        "checkpoint-100",
        "checkpoint-200",
    }
    status = run_status(local, remote, settle_seconds=0, reread=True).run_files
    assert status is not None and (status.remote, status.files, status.changed) == ("verified", 4, ())

    restored = tmp_path / "restored"
    result = pull_run(remote, str(restored))
    assert result.run_files is not None and sorted(result.run_files.restored) == sorted(RUN_FILES)
    assert tree(restored) == tree(run)  # checkpoints and run files, byte for byte
    for name in RUN_FILES:  # times come back too
        assert (restored / name).stat().st_mtime == (run / name).stat().st_mtime, name
    assert not list(restored.glob(".*ckptctl-partial"))

    # Unchanged: nothing is sent again. Appended to: only that file is.
    assert not push(local, remote, OPTIONS).run_files.sent
    with (run / "eval.jsonl").open("a") as handle:
        handle.write('{"step": 300, "loss": 1.9}\n')
    changed = run_status(local, remote, settle_seconds=0).run_files
    assert changed is not None and changed.changed == ("eval.jsonl",)
    again = push(local, remote, OPTIONS)
    assert [p for p, _ in again.run_files.sent] == ["eval.jsonl"] and again.run_files.unchanged == 3
    second = pull_run(remote, str(tmp_path / "second"))
    assert tree(tmp_path / "second") == tree(run)
    assert second.run_files is not None and second.run_files.failed == []


def test_a_differing_local_file_is_kept_and_reported(tmp_path: Path) -> None:
    run = make_run_with_files(tmp_path / "run")
    remote = tmp_path / "remote"
    assert run_cli("tier", "push", str(run), "--to", str(remote), "--settle", "0").returncode == 0
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "config.json").write_text('{"mine": true}')
    (dest / "tokenizer.json").write_bytes((run / "tokenizer.json").read_bytes())  # the same: left alone

    pulled = run_cli("tier", "pull", str(remote), str(dest), "--all")

    assert pulled.returncode == 0, pulled.stderr
    assert "warning: run file config.json: the local file differs from the pushed one: kept" in pulled.stderr
    assert (dest / "config.json").read_text() == '{"mine": true}'
    assert tree(dest) == {**tree(run), "config.json": b'{"mine": true}'}
    again = run_cli("tier", "pull", str(remote), str(dest), "--all", "--json")
    assert again.returncode == 0, again.stderr
    files = json.loads(again.stdout)["data"]["run_files"]
    assert files["restored"] == [] and files["kept"][0]["path"] == "config.json"
    assert sorted(files["present"]) == ["eval.jsonl", "logs/train.log", "tokenizer.json"]


@pytest.mark.parametrize("store", ["local", "memory", "s3", "gcs"])
def test_a_planted_object_is_caught_by_status_and_pull(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from tests.conftest import make_backend

    backend = make_backend(store, tmp_path, request)
    run = make_run_with_files(tmp_path / "run")
    local, remote = Location.from_url(str(run)), backend.location("remote")
    push(local, remote, OPTIONS)
    planted = bytes(len((run / "eval.jsonl").read_bytes()))  # same size, other bytes
    remote.fs.pipe_file(remote.full_path("eval.jsonl"), planted)

    # Local folders and memory:// keep no checksum: there it takes --verify (a re-read) to see it.
    status = run_status(local, remote, settle_seconds=0, reread=store in ("local", "memory")).run_files
    assert status is not None and status.remote == "corrupt" and "eval.jsonl" in status.problems[0]
    dest = tmp_path / "dest"
    result = pull_run(remote, str(dest))
    assert result.run_files is not None
    assert [(path, e.code) for path, e in result.run_files.failed] in (
        [("eval.jsonl", "integrity")],
        [("eval.jsonl", "checksum_mismatch")],  # only the download could tell
    )
    assert (
        not (dest / "eval.jsonl").exists()
        and (dest / "config.json").read_bytes() == (run / "config.json").read_bytes()
    )
    assert not list(dest.glob(".*ckptctl-partial"))
    if store == "local":  # the commands' exit codes: status 8 (corrupt), pull --all 5 (partly done)
        url = str(tmp_path / "store" / "remote")
        shown = run_cli("tier", "status", str(run), "--remote", url, "--verify", "--json", "--settle", "0")
        assert shown.returncode == 8 and json.loads(shown.stdout)["data"]["run_files"]["remote"] == "corrupt"
        pulled = run_cli("tier", "pull", url, str(tmp_path / "cli"), "--all", "--json")
        assert pulled.returncode == 5 and "Traceback" not in pulled.stderr
        failed = json.loads(pulled.stdout)["data"]["failed"]
        assert [(f["unit"], f["run_file"]) for f in failed] == [("eval.jsonl", True)]
    if store in ("s3", "gcs"):
        # A push repairs it: the listing (ETag, CRC32C) no longer vouches for the object, so it is sent again.
        # Local folders and memory:// cannot tell without a re-read, as for checkpoints.
        assert push(local, remote, OPTIONS).run_files.sent == [("eval.jsonl", len(planted))]
        assert pull_run(remote, str(tmp_path / "fixed")).run_files.failed == []  # type: ignore[union-attr]


def test_ckptctl_state_pointers_links_and_special_files_are_not_pushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run_with_files(tmp_path / "run")
    (run / ".ckptctl-deleting.json").write_bytes(encode_journal([], time.time()))
    (run / ".ckptctl-tmp-0123456789abcdef").write_bytes(b"half a write")
    (run / ".checkpoint-300.ckptctl-partial").mkdir()
    (run / ".checkpoint-300.ckptctl-partial" / "model.safetensors").write_bytes(b"a pull under way")
    (run / "latest").write_text("checkpoint-200")  # a pointer file: tiering.pointers' business
    (run / "checkpoint-300-unfinished").write_text("")
    (run / "tokenizer_link.json").symlink_to("tokenizer.json")
    (run / "best").symlink_to("checkpoint-200")  # a pointer link: neither pushed nor reported
    os.mkfifo(run / "logs" / "pipe")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("lr: 0.1\n")
    (run / "wandb").mkdir()
    for index in range(4):
        (run / "wandb" / f"media-{index}.png").write_bytes(b"x")
    monkeypatch.setattr(run_files, "MAX_GROUP_FILES", 3)
    local, remote = Location.from_url(str(run)), Location.from_url(str(tmp_path / "remote"))

    result = push(local, remote, OPTIONS)

    assert run_files_of(remote) == sorted((*RUN_FILES, ".hydra/config.yaml"))
    skipped = {s.path: s.reason for s in result.run_files.skipped}
    assert set(skipped) == {"tokenizer_link.json", "logs/pipe", "wandb/"}
    assert "symbolic link" in skipped["tokenizer_link.json"] and "regular file" in skipped["logs/pipe"]
    assert "4 file(s)" in skipped["wandb/"]
    assert not remote.exists("tokenizer_link.json") and not remote.exists("logs/pipe")
    assert not remote.exists(".ckptctl-deleting.json") and not remote.exists(".ckptctl-tmp-0123456789abcdef")
    assert remote.read_bytes("latest") == b"checkpoint-200"  # sent as a pointer, as before


def test_pull_of_one_step_restores_no_run_files_and_a_run_without_any_has_no_manifest(tmp_path: Path) -> None:
    run = make_run_with_files(tmp_path / "run")
    remote = Location.from_url(str(tmp_path / "remote"))
    push(Location.from_url(str(run)), remote, OPTIONS)
    latest = tmp_path / "latest"
    pull(remote, str(latest), latest=True)
    assert sorted(p.name for p in latest.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
    ]
    some = pull_run(remote, str(tmp_path / "some"), steps=frozenset({100}))
    assert some.run_files is None and sorted(p.name for p in (tmp_path / "some").iterdir()) == [
        "checkpoint-100"
    ]
    help_text = run_cli("tier", "pull", "--help").stdout
    assert "--step, --latest and --steps restore no run files" in " ".join(help_text.split())

    bare = make_run(tmp_path / "bare", steps=(100,), incomplete=None)
    bare_remote = Location.from_url(str(tmp_path / "bare-remote"))
    assert not push(Location.from_url(str(bare)), bare_remote, OPTIONS).run_files.manifest_written
    assert not bare_remote.exists(RUN_FILES_MANIFEST)
    assert pull_run(bare_remote, str(tmp_path / "bare-back")).run_files is None


def test_a_file_removed_locally_stays_listed_and_a_manifest_naming_a_checkpoint_file_is_refused(
    tmp_path: Path,
) -> None:
    run = make_run_with_files(tmp_path / "run")
    remote_root = tmp_path / "remote"
    local, remote = Location.from_url(str(run)), Location.from_url(str(remote_root))
    push(local, remote, OPTIONS)
    config = (run / "config.json").read_bytes()
    (run / "config.json").unlink()  # a push from a copy of the run that lacks it
    push(local, remote, OPTIONS)
    assert "config.json" in run_files_of(remote)
    status = run_status(local, remote, settle_seconds=0).run_files
    assert status is not None and status.remote_only == ("config.json",)

    # Someone with write access to the bucket makes the run files name a checkpoint's file.
    manifest = remote_view(remote).run_files
    assert manifest is not None
    evil = next(f for f in manifest.files if f.path == "eval.jsonl")
    (remote_root / "checkpoint-100" / "notes.jsonl").write_bytes((run / "eval.jsonl").read_bytes())
    forged = dataclasses.replace(evil, path="checkpoint-100/notes.jsonl")
    encoded = Manifest("", "dir", None, "run-files", (*manifest.files, forged), "x").encode()
    (remote_root / RUN_FILES_MANIFEST).write_bytes(encoded)
    dest = tmp_path / "dest"
    result = pull_run(remote, str(dest))
    assert result.run_files is not None
    assert [(p, "inside checkpoint checkpoint-100" in e.message) for p, e in result.run_files.failed] == [
        ("checkpoint-100/notes.jsonl", True)
    ]
    assert not (dest / "checkpoint-100" / "notes.jsonl").exists()
    assert (dest / "config.json").read_bytes() == config  # only the remote had it


def test_kill_minus_9_in_the_run_files_phase_leaves_a_manifest_that_matches_its_objects(
    tmp_path: Path,
) -> None:
    """One trial: the push is killed right after it has set the changed eval.jsonl aside (the manifest less that
    file) and while a large new log goes up. The manifest on the store still matches every object it lists, and
    a re-run records both files."""
    run = make_run_with_files(tmp_path / "run")
    remote_root = tmp_path / "remote"
    remote = Location.from_url(str(remote_root))
    push(Location.from_url(str(run)), remote, OPTIONS)
    before = tree(run)
    with (run / "eval.jsonl").open("a") as handle:
        handle.write('{"step": 300, "loss": 1.9}\n')
    with (run / "logs" / "big.log").open("wb") as handle:
        handle.truncate(128 * 2**20)  # sparse: quick to make and to read, slow enough to write remotely
    after = tree(run)
    command = [
        sys.executable,
        "-m",
        "ckptctl",
        "tier",
        "push",
        str(run),
        "--to",
        str(remote_root),
        "--settle",
        "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        try:
            listed = [f["path"] for f in json.loads((remote_root / RUN_FILES_MANIFEST).read_bytes())["files"]]
        except (OSError, ValueError):
            listed = []
        if listed and "eval.jsonl" not in listed:
            process.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    process.wait()
    assert killed, "the push finished before its run-files phase could be interrupted"

    view = remote_view(remote)
    assert view.bad_run_files is None and view.run_files is not None
    assert check_manifest(view, view.run_files, reread=True).state == "verified"
    for item in view.run_files.files:
        assert (remote_root / item.path).read_bytes() in (before.get(item.path), after[item.path]), item.path
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert run_files_of(remote) == sorted((*RUN_FILES, "logs/big.log"))
    restored = tmp_path / "restored"
    pull_run(remote, str(restored))
    assert tree(restored) == after
