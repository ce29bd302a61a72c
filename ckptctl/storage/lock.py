"""One advisory lock per run, so two prunes (two cron jobs, a cron job and a person) never race.

Local disks: ``flock`` on ``<run>/.ckptctl.lock`` (released by the kernel if the process dies). Object stores: a
lease object created only if absent (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``) holding an expiry;
an expired lease (its holder died) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

from ckptctl.errors import LockedError
from ckptctl.storage.location import Location

LOCK_NAME = ".ckptctl.lock"
DEFAULT_LEASE_SECONDS = 3600.0


@contextlib.contextmanager
def run_lock(location: Location, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Iterator[None]:
    """Hold the run's lock for the block; raises LockedError at once when another process holds it."""
    if location.is_local:
        with _local_lock(location):
            yield
        return
    with _lease(location, lease_seconds):
        yield


@contextlib.contextmanager
def _local_lock(location: Location) -> Iterator[None]:
    import fcntl

    if not os.path.isdir(location.full_path()):
        location.walk()  # raises the error that names the run: not found, or a file where a run was expected
    path = location.full_path(LOCK_NAME)
    with location.errors(LOCK_NAME):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{location.url} is locked by another ckptctl process",
                url=location.url,
                hint="try again later",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _lease(location: Location, lease_seconds: float) -> Iterator[None]:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + lease_seconds}
    data = json.dumps(holder).encode()
    path = location.full_path(LOCK_NAME)
    for _ in range(2):
        try:
            with location.errors(LOCK_NAME):
                location.fs.pipe_file(path, data, mode="create")
            break
        except FileExistsError:
            if not _expired(location):
                raise LockedError(
                    f"{location.url} is locked by another ckptctl process (lease object {LOCK_NAME})",
                    url=location.url,
                    hint=f"if no ckptctl is running, the lease expires by itself; or delete {location.url_of(LOCK_NAME)}",
                ) from None
            location.delete_files([LOCK_NAME])
    else:  # pragma: no cover - a third process took the expired lease between our two attempts
        raise LockedError(f"{location.url} is locked by another ckptctl process", url=location.url)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            location.delete_files([LOCK_NAME])


def _expired(location: Location) -> bool:
    try:
        lease = json.loads(location.read_bytes(LOCK_NAME))
        return float(lease["expires"]) < time.time()
    except Exception:
        return False
