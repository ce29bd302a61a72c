"""One advisory lock per run, so two prunes (two cron jobs, a cron job and a person) never race.

Local disks: ``flock`` on ``<run>/.ckptctl.lock`` (released by the kernel if the process dies; the file is
removed on release). Object stores: a lease object created only if absent (S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``) holding an expiry; an expired lease (its holder died) is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import time
from collections.abc import Iterator

from ckptctl.errors import LockedError, UnsafeTargetError
from ckptctl.storage.atomic import FILE_MODE
from ckptctl.storage.location import Location

LOCK_NAME = ".ckptctl.lock"
DEFAULT_LEASE_SECONDS = 3600.0
_LOCK_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_ACQUIRE_ATTEMPTS = 20


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
