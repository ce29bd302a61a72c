"""A remote run lock outlives its lease while the work runs (renewed), is never taken by a second ckptctl
meanwhile, and a holder that lost it (stalled past the expiry, taken over) is told before it goes on."""

from __future__ import annotations

import json
import os
import time

import pytest

from ckptctl.errors import LockedError
from ckptctl.storage.lock import LOCK_NAME, run_lock
from tests.conftest import Backend

LEASE = 2.5  # seconds: short, yet several renewals even on a loaded machine and a slow emulator
STORES = pytest.mark.parametrize("backend", ["memory", "s3", "gcs"], indirect=True)


def _run(backend: Backend):
    location = backend.location("run")
    location.write_bytes("checkpoint-1/model.safetensors", b"x")
    return location


@STORES
def test_a_lease_held_past_its_length_is_never_taken(backend: Backend) -> None:
    location = _run(backend)
    with run_lock(location, lease_seconds=LEASE) as lease:
        deadline = time.monotonic() + 2.5 * LEASE
        attempts = 0
        while time.monotonic() < deadline:
            if backend.name != "gcs":  # the GCS emulator ignores ifGenerationMatch=0 (real GCS honours it)
                with pytest.raises(LockedError), run_lock(location, lease_seconds=LEASE):
                    pass
            attempts += 1
            lease.check()  # still ours
            time.sleep(0.3)
        assert attempts >= 5 and not lease.lost
        held = json.loads(location.read_bytes(LOCK_NAME))
        assert held["expires"] > time.time()  # renewed: the first expiry passed long ago
    assert not location.exists(LOCK_NAME)  # released
    with run_lock(location, lease_seconds=LEASE):  # and free for the next one
        pass


@STORES
def test_a_holder_whose_lease_was_taken_over_stops_and_leaves_the_new_lease(backend: Backend) -> None:
    location = _run(backend)
    with run_lock(location, lease_seconds=LEASE) as lease:
        other = {"host": "elsewhere", "pid": 1, "token": "not-ours", "expires": time.time() + 3600}
        location.fs.pipe_file(location.full_path(LOCK_NAME), json.dumps(other).encode())
        deadline = time.monotonic() + 3 * LEASE
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(LockedError, match="another ckptctl process took over its lease"):
            lease.check()
    assert json.loads(location.read_bytes(LOCK_NAME))["token"] == "not-ours"  # not removed on release


@STORES
def test_an_expired_lease_is_taken_over_but_a_live_one_is_not(backend: Backend) -> None:
    location = _run(backend)
    dead = {"host": "gone", "pid": 1, "token": "dead", "expires": time.time() - 5}
    location.fs.pipe_file(location.full_path(LOCK_NAME), json.dumps(dead).encode())
    with run_lock(location, lease_seconds=LEASE) as lease:
        assert json.loads(location.read_bytes(LOCK_NAME))["token"] != "dead"
        lease.check()


@pytest.mark.parametrize("backend", ["memory", "s3"], indirect=True)
def test_a_lease_of_a_killed_process_on_this_machine_is_taken_over_at_once(backend: Backend) -> None:
    import subprocess
    import sys

    from ckptctl.storage.lock import _process_scope

    location = _run(backend)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = {
        "host": "x",
        "pid": int(gone.stdout),
        "scope": _process_scope(),
        "token": "dead",
        "expires": time.time() + 3600,
    }
    location.fs.pipe_file(location.full_path(LOCK_NAME), json.dumps(dead).encode())
    with run_lock(location, lease_seconds=LEASE):
        assert json.loads(location.read_bytes(LOCK_NAME))["token"] != "dead"
    alive = {**dead, "pid": os.getpid(), "token": "alive"}  # this very process: alive, so refused
    location.fs.pipe_file(location.full_path(LOCK_NAME), json.dumps(alive).encode())
    with pytest.raises(LockedError, match="locked by another ckptctl process"), run_lock(location):
        pass


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_a_stale_conditional_write_is_a_conflict_read_from_the_error_not_its_text(backend: Backend) -> None:
    """A lease write against a version that is gone is a conflict (the lease was taken); any other error stays
    that error, even when its message holds "412" (a run named run-412): reading the text once mistook those."""
    import botocore.exceptions
    from gcsfs.retry import HttpError
    from s3fs.errors import translate_boto_error

    from ckptctl.storage.lock import _precondition_failed

    location = backend.location("run-412")
    path = location.full_path(LOCK_NAME)
    location.fs.pipe_file(path, b"{}")
    with pytest.raises(Exception) as stale:  # what s3fs raises for moto's real 412
        location.fs.pipe_file(path, b"{}", IfMatch='"0123456789abcdef0123456789abcdef"')
    assert _precondition_failed(stale.value)

    denied = botocore.exceptions.ClientError(
        {
            "Error": {"Code": "AccessDenied", "Message": f"Access Denied for {path} (request 412)"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        },
        "PutObject",
    )
    assert not _precondition_failed(denied)
    assert not _precondition_failed(translate_boto_error(denied))
    assert not _precondition_failed(OSError(f"Forbidden: run-412/{LOCK_NAME}"))
    assert _precondition_failed(HttpError({"code": 412, "message": "conditionNotMet"}))  # gcsfs, real GCS
    assert _precondition_failed(FileExistsError(path))  # gcsfs's 412 on a write; s3fs's If-None-Match
