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
