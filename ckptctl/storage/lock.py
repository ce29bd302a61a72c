"""One advisory lock per run, so two prunes (two cron jobs, a cron job and a person) never race.

Local disks: ``flock`` on ``<run>/.ckptctl.lock`` (released by the kernel if the process dies, so it never
needs renewing; the file is removed on release). Object stores: a lease object created only if absent (S3
``If-None-Match: *``, GCS ``ifGenerationMatch=0``) holding the holder's token and an expiry; an expired lease
(its holder died) is taken over. While the block runs, a thread renews the lease every third of its length, so
a push of many terabytes that outlasts the lease keeps it; a holder that finds another's token in the object
(it stalled past its expiry and was taken over) stops at its next ``Lease.check()``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ckptctl.errors import LockedError, UnsafeTargetError
from ckptctl.storage.atomic import FILE_MODE
from ckptctl.storage.location import Location

LOCK_NAME = ".ckptctl.lock"
DEFAULT_LEASE_SECONDS = 3600.0
_LOCK_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_ACQUIRE_ATTEMPTS = 20


class Lease:
    """The run's lock, held. ``check()`` raises LockedError once the lock was lost, so long work stops at its
    next safe point instead of going on unprotected; a local ``flock`` is never lost."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self._lost: str | None = None

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        if self._lost is not None:
            raise LockedError(
                f"{self.location.url}: {self._lost}; stopped so that two ckptctl processes never work on it at once",
                url=self.location.url,
                hint="re-run when the other process is done; what was finished is kept",
            )

    def _lose(self, why: str) -> None:
        self._lost = why


@contextlib.contextmanager
def run_lock(location: Location, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the run's lock for the block; raises LockedError at once when another process holds it. On an
    object store the lease is renewed while the block runs (one small read and write per third of
    ``lease_seconds``)."""
    if location.is_local:
        with _local_lock(location):
            yield Lease(location)
        return
    with _lease(location, lease_seconds) as lease:
        yield lease


@contextlib.contextmanager
def _local_lock(location: Location) -> Iterator[None]:
    """``flock`` on ``<run>/.ckptctl.lock``, which is removed again on release (the run holds no file the user
    never made).

    Removal is safe against a concurrent acquirer: the holder unlinks the file while it still holds the flock,
    and an acquirer, once its flock succeeds, checks that the file it locked is still the one at that path (same
    inode) and starts again if not, so two processes never both hold a lock on "the" lock file. The file is opened
    without following a link; a link, a FIFO or device, or a file with other hard links in its place is refused
    (UnsafeTargetError) and left exactly as it is.
    """
    if not os.path.isdir(location.full_path()):
        location.walk()  # raises the error that names the run: not found, or a file where a run was expected
    path = location.full_path(LOCK_NAME)
    fd = _acquire(location, path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        yield
    finally:
        _release(fd, path)


def _acquire(location: Location, path: str) -> int:
    """An fd of the lock file at ``path``, flocked, and still the file at ``path``."""
    import fcntl

    for _ in range(_ACQUIRE_ATTEMPTS):
        with location.errors(LOCK_NAME):
            try:
                fd = os.open(path, _LOCK_FLAGS, FILE_MODE)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise _unsafe_lock(location, path, "is a symbolic link") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _unsafe_lock(location, path, "is not a regular file (a FIFO, device or socket)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _locked(location) from None
            held = os.fstat(fd)
            if _same_file(held, path):
                if held.st_nlink > 1:
                    raise _unsafe_lock(location, path, f"has {held.st_nlink - 1} other hard link(s)")
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed it (or it was replaced) while we waited: lock the file there now
    raise _locked(location)


def _release(fd: int, path: str) -> None:
    try:
        if _same_file(os.fstat(fd), path):
            os.unlink(path)  # while the flock is held: no one can have locked this inode meanwhile
    except OSError:
        pass  # a lock file left behind is harmless: the next holder re-uses it and removes it
    finally:
        os.close(fd)


def _same_file(held: os.stat_result, path: str) -> bool:
    try:
        there = os.lstat(path)
    except FileNotFoundError:
        return False
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def _locked(location: Location) -> LockedError:
    return LockedError(
        f"{location.url} is locked by another ckptctl process", url=location.url, hint="try again later"
    )


def _unsafe_lock(location: Location, path: str, what: str) -> UnsafeTargetError:
    return UnsafeTargetError(
        f"{location.url_of(LOCK_NAME)} {what}; ckptctl never writes through it or removes it",
        url=path,
        hint="remove it yourself if it is not a lock of yours, then re-run",
    )


@contextlib.contextmanager
def _lease(location: Location, lease_seconds: float) -> Iterator[Lease]:
    token = uuid.uuid4().hex
    path = location.full_path(LOCK_NAME)
    for _ in range(2):
        try:
            with location.errors(LOCK_NAME):
                location.fs.pipe_file(path, _lease_bytes(token, lease_seconds), mode="create")
            break
        except FileExistsError:
            seen = _read_lease(location)
            if seen is None or not _is_expired(seen):
                raise LockedError(
                    f"{location.url} is locked by another ckptctl process (lease object {LOCK_NAME})",
                    url=location.url,
                    hint=f"if no ckptctl is running, the lease expires by itself; or delete {location.url_of(LOCK_NAME)}",
                ) from None
            if _read_lease(location) != seen:  # renewed (or taken) since we read it: not ours to remove
                raise LockedError(
                    f"{location.url} is locked by another ckptctl process", url=location.url
                ) from None
            location.delete_files([LOCK_NAME])
    else:  # pragma: no cover - a third process took the expired lease between our two attempts
        raise LockedError(f"{location.url} is locked by another ckptctl process", url=location.url)
    lease = Lease(location)
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(location, token, lease_seconds, stop, lease), name="ckptctl-lease", daemon=True
    )
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join(timeout=30)
        with contextlib.suppress(Exception):
            held = _read_lease(location)
            if held is not None and held.get("token") == token:  # never remove a lease another took over
                location.delete_files([LOCK_NAME])


def _lease_bytes(token: str, lease_seconds: float) -> bytes:
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": token,
        "expires": time.time() + lease_seconds,
    }
    return json.dumps(holder).encode()


def _renew(location: Location, token: str, lease_seconds: float, stop: threading.Event, lease: Lease) -> None:
    """Rewrite the lease with a new expiry every third of its length while it is still ours. A failed renewal
    (the store briefly unreachable) is retried at the next tick; once our expiry has passed unrenewed, or the
    object holds another token, the lease is lost."""
    path = location.full_path(LOCK_NAME)
    expires = time.time() + lease_seconds
    while not stop.wait(lease_seconds / 3):
        try:
            held = _read_lease(location)
            if held is None or held.get("token") != token:
                lease._lose(
                    "another ckptctl process took over its lease (this one stalled past the lease's expiry)"
                )
                return
            location.fs.pipe_file(path, _lease_bytes(token, lease_seconds))
            expires = time.time() + lease_seconds
        except Exception:  # transient store errors: try again at the next tick
            if time.time() > expires:
                lease._lose("its lease expired while the store could not be reached to renew it")
                return


def _read_lease(location: Location) -> dict[str, Any] | None:
    """The lease object's content, or None when it is missing or not a lease (never an error: a garbled
    lease is not ours and not expired)."""
    try:
        value = json.loads(location.read_bytes(LOCK_NAME))
    except Exception:  # unreadable or not JSON
        return None
    return value if isinstance(value, dict) else None


def _is_expired(lease: dict[str, Any]) -> bool:
    try:
        return float(lease["expires"]) < time.time()
    except (KeyError, TypeError, ValueError):
        return False
