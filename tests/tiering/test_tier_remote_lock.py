"""``tier push`` holds the remote run's lease: a second push to the same remote (another machine) is refused
before it uploads, deletes or writes a manifest; a dry run takes no lock; a push that loses its lease stops."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ckptctl.errors import LockedError
from ckptctl.storage import Location
from ckptctl.storage.lock import LOCK_NAME, run_lock
from ckptctl.tiering.manifest import MANIFEST_DIR
from ckptctl.tiering.push import PushOptions, push, push_locks
from tests.conftest import Backend, run_cli
from tests.tiering.test_tier import make_run


@pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
def test_a_push_to_a_remote_another_push_holds_is_refused_and_writes_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    run = make_run(tmp_path / "run", steps=(100,), size=20_000, incomplete=None)
    remote = backend.location("remote")
    with run_lock(remote, lease_seconds=30):  # the other machine's push
        cli = run_cli("tier", "push", str(run), "--to", f"{backend.url}/remote", "--settle", "0",
                      *backend.cli_options)  # fmt: skip
        assert cli.returncode == 6, cli.stderr
        assert "locked by another ckptctl process" in cli.stderr and "Traceback" not in cli.stderr
        assert [e.path for e in remote.walk() if e.type == "file"] == [LOCK_NAME]  # nothing uploaded
        dry = run_cli("tier", "push", str(run), "--to", f"{backend.url}/remote", "--settle", "0",
                      "--dry-run", "--json", *backend.cli_options)  # fmt: skip
        assert dry.returncode == 0, dry.stderr  # a dry run takes no lock
        summary = [json.loads(line) for line in dry.stdout.splitlines() if '"summary"' in line][-1]
        assert summary["would_upload"] == 1, summary
    cli = run_cli("tier", "push", str(run), "--to", f"{backend.url}/remote", "--settle", "0",
                  *backend.cli_options)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    files = {e.path for e in remote.walk() if e.type == "file"}
    assert f"{MANIFEST_DIR}/checkpoint-100.json" in files and LOCK_NAME not in files  # released after


@pytest.mark.parametrize("backend", ["memory", "s3"], indirect=True)
def test_a_push_that_loses_its_remote_lease_stops_before_the_next_manifest(
    backend: Backend, tmp_path: Path
) -> None:
    run = make_run(tmp_path / "run", steps=(100, 200, 300), size=20_000, incomplete=None)
    local, remote = Location.from_url(str(run)), backend.location("remote")
    taken = []

    def on_event(kind: str, **fields: object) -> None:
        if kind == "uploaded" and not taken:  # another ckptctl takes the remote over after the first unit
            other = {"host": "elsewhere", "pid": 1, "token": "theirs", "expires": time.time() + 3600}
            remote.fs.pipe_file(remote.full_path(LOCK_NAME), json.dumps(other).encode())
            taken.append(True)
            deadline = time.monotonic() + 10  # a renewal comes every third of the 2 s lease, even under load
            while not lease.lost and time.monotonic() < deadline:
                time.sleep(0.05)

    with (
        pytest.raises(LockedError, match="took over its lease"),
        push_locks(local, remote, lease_seconds=2.0) as held,
    ):
        lease = held.lease
        push(local, remote, PushOptions(settle_seconds=0, jobs=2), on_event=on_event, lease=lease)
    manifests = [e.path for e in remote.walk() if e.path.startswith(MANIFEST_DIR + "/")]
    assert manifests == [f"{MANIFEST_DIR}/checkpoint-100.json"]  # nothing written after the loss
    assert json.loads(remote.read_bytes(LOCK_NAME))["token"] == "theirs"  # their lease left alone
    assert not (run / LOCK_NAME).exists()  # the local lock released
