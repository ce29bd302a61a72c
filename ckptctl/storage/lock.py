"""One advisory lock per run, so two prunes (two cron jobs, a cron job and a person) never race.

Local disks: ``flock`` on ``<run>/.ckptctl.lock`` (released by the kernel if the process dies, so it never
needs renewing; the file is removed on release). Object stores: a lease object created only if absent (S3
``If-None-Match: *``, GCS ``ifGenerationMatch=0``) holding the holder's token and an expiry; an expired lease
(its holder died) is taken over in one write conditional on the version read, so a lease a live holder has just
renewed is never replaced or deleted. While the block runs, a thread renews the lease every third of its
length, each write conditional on the version we wrote last (S3 ``If-Match`` on the ETag, GCS
``ifGenerationMatch``, memory:// under one process lock, other stores a re-read just before), so a push of many
terabytes that outlasts the lease keeps it; a holder that finds another's token in the object (it stalled past
its expiry and was taken over) stops at its next ``Lease.check()``. Expiry is judged by the reader's clock
against the writer's: clocks further apart than a tenth of the lease are not supported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import stat
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

from ckptctl.errors import CkptctlError, LockedError, NotFoundError, UnsafeTargetError
from ckptctl.storage.atomic import FILE_MODE
from ckptctl.storage.location import Location

LOCK_NAME = ".ckptctl.lock"
DEFAULT_LEASE_SECONDS = 600.0
"""Renewed every third while held, so it bounds only how long a holder that died blocks the next one (on
another machine; one on the same machine sees the holder's process is gone and takes over at once)."""
_LOCK_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_ACQUIRE_ATTEMPTS = 20
_MAX_LEASE_BYTES = 4096


@contextlib.contextmanager
def run_lock(location: Location, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the run's lock for the block; raises LockedError at once when another process holds it.

    Yields a ``Lease``: long work calls ``lease.check()`` between units (before each upload, each manifest), so
    a holder that lost an object-store lease stops there instead of going on unprotected. On an object store
    the lease is renewed while the block runs (one small read and one conditional write per third of
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


class Lease:
    """The holder's view of its run lock, for the worker to consult between units of work.

    Local locks are ``flock``s the kernel holds for as long as the process lives: nothing expires, nothing to
    renew, ``check`` never raises. Object-store leases are renewed by a daemon thread every third of the lease;
    ``check`` raises LockedError once the thread found another holder's token in the lease object, or once the
    last expiry we wrote is near without a successful renewal (the store unreachable: we can no longer tell
    that the run is ours). Costs: one GET and one conditional PUT per renewal.
    """

    def __init__(self, location: Location, lease_seconds: float | None = None) -> None:
        self.location = location
        self.lease_seconds = lease_seconds
        self.token = uuid.uuid4().hex
        self.expires = math.inf
        self.version: object = None
        self.lost_to: str | None = None
        self.last_error: str | None = None

    @property
    def lost(self) -> bool:
        return self.lost_to is not None

    def check(self) -> None:
        """Raise LockedError when the lease is no longer certainly ours; call it before each unit of work."""
        url = self.location.url
        if self.lost_to is not None:
            raise LockedError(
                f"{url}: another ckptctl process took over its lease ({self.lost_to}); stopped before doing more",
                url=url,
                hint="a re-run finishes the work once the other process is done",
            )
        margin = min(60.0, (self.lease_seconds or 0.0) / 10)
        if time.time() > self.expires - margin:
            raise LockedError(
                f"{url}: could not renew its lease before it expired ({self.last_error or 'no answer'}); "
                "stopped before doing more",
                url=url,
                hint="a re-run finishes the work",
            )

    def body(self, expires: float) -> bytes:
        """The lease object's bytes for an expiry of ``expires``."""
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "scope": _process_scope(),
                "token": self.token,
                "expires": expires,
            }
        ).encode()


class _Conflict(Exception):
    """The lease object is not the version we expected (a conditional write or delete was refused)."""


_MEMORY_CAS = threading.Lock()
"""memory:// lives in this process: a compare-and-swap is exact under one lock."""


def _store_kind(location: Location) -> str:
    protocol = location.protocol
    if protocol in ("s3", "s3a"):
        return "s3"
    if protocol in ("gs", "gcs"):
        return "gcs"
    return "memory" if protocol == "memory" else "other"


def _read_lease(location: Location) -> tuple[bytes, object] | None:
    """The lease's bytes and a version to make a write or delete conditional on (S3 ETag, GCS generation, the
    bytes themselves elsewhere); None when there is none."""
    path = location.full_path(LOCK_NAME)
    kind = _store_kind(location)
    try:
        with location.errors(LOCK_NAME):
            version: object = None
            if kind in ("s3", "gcs"):
                location.fs.invalidate_cache(path)
                info = location.fs.info(path)
                version = info.get("ETag") if kind == "s3" else info.get("generation")
            data = bytes(location.fs.cat_file(path, start=0, end=_MAX_LEASE_BYTES))
    except NotFoundError:
        return None
    return data, (version if version is not None else data)


def _write_lease(location: Location, data: bytes, *, match: object = None) -> object:
    """Write the lease: created only if absent (``match`` None) or replacing exactly version ``match``.
    Returns the new version; raises _Conflict when the store holds something else."""
    fs = location.fs
    path = location.full_path(LOCK_NAME)
    kind = _store_kind(location)
    try:
        with location.errors(LOCK_NAME):
            if kind == "memory":
                with _MEMORY_CAS:
                    there = fs.cat_file(path) if fs.exists(path) else None
                    if (match is None and there is not None) or (match is not None and there != match):
                        raise _Conflict()
                    fs.pipe_file(path, data)
                return data
            if match is None:
                out = fs.pipe_file(path, data, mode="create")
            elif kind == "s3":
                out = fs.pipe_file(path, data, IfMatch=match)
            elif kind == "gcs":
                bucket, key, _ = fs.split_path(path)
                # gcsfs's pipe_file takes no generation: its own multipart upload, with the precondition.
                head = json.dumps({"name": key}).encode()
                body = (
                    b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n"
                    + head
                    + b"\n--==0==\nContent-Type: application/json\n\n"
                    + data
                    + b"\n--==0==--"
                )
                out = fs.call(
                    "POST",
                    f"{fs._location}/upload/storage/v1/b/{urllib.parse.quote(bucket)}/o",
                    uploadType="multipart",
                    ifGenerationMatch=str(match),
                    headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                    data=body,
                    json_out=True,
                )
                fs.invalidate_cache(path)
            else:  # no conditional write: re-read right before the write (a small window, stated in the docs)
                current = _read_lease(location)
                if current is None or current[1] != match:
                    raise _Conflict()
                fs.pipe_file(path, data)
                return data
    except FileExistsError:
        raise _Conflict() from None
    except CkptctlError:
        raise
    except Exception as exc:
        if _precondition_failed(exc):
            raise _Conflict() from None
        raise
    if kind == "s3" and isinstance(out, dict) and out.get("ETag"):
        return out["ETag"]
    if kind == "gcs" and isinstance(out, dict) and out.get("generation"):
        return str(out["generation"])
    current = _read_lease(location)
    if current is None or current[0] != data:
        raise _Conflict()
    return current[1]


def _delete_lease(location: Location, match: object) -> None:
    """Remove the lease only while it is still version ``match`` (conditional where the store has it, else a
    re-read first): a release or a takeover never deletes a lease another holder has just written."""
    fs = location.fs
    path = location.full_path(LOCK_NAME)
    kind = _store_kind(location)
    with contextlib.suppress(FileNotFoundError, NotFoundError), location.errors(LOCK_NAME):
        if kind == "memory":
            with _MEMORY_CAS:
                if fs.exists(path) and fs.cat_file(path) == match:
                    fs.rm_file(path)
            return
        if kind in ("s3", "gcs"):
            bucket, key, _ = fs.split_path(path)
            try:
                if kind == "s3":
                    fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=match)
                else:
                    fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(match))
            except Exception as exc:
                if _precondition_failed(exc):
                    return  # another holder's lease now: not ours to delete
                raise
            fs.invalidate_cache(path)
            return
        current = _read_lease(location)
        if current is not None and current[1] == match:
            fs.rm_file(path)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether the store refused a conditional request because the object is no longer the version named (HTTP
    412, or S3's ConditionalRequestConflict for two conditional writes racing), read from the error's structure and never from its text:
    a bucket or key may well contain "412". s3fs and gcsfs raise FileExistsError for some of these, an OSError
    whose cause is botocore's ClientError for the rest; gcsfs's HttpError carries the status as ``code``."""
    if isinstance(exc, FileExistsError):
        return True
    for error in (exc, exc.__cause__, exc.__context__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return True
        if getattr(error, "code", None) == 412:
            return True
    return False


def _holder(data: bytes) -> dict[str, Any]:
    try:
        lease = json.loads(data)
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


def _describe(lease: dict[str, Any]) -> str:
    return f"{lease.get('host', '?')} pid {lease.get('pid', '?')}"


@contextlib.contextmanager
def _lease(location: Location, lease_seconds: float) -> Iterator[Lease]:
    """Take the lease object (created if absent, or an expired one replaced in one conditional write), renew
    it on a daemon thread while the block runs, and remove it on exit if it is still ours."""
    lease = Lease(location, lease_seconds)
    expires = time.time() + lease_seconds
    for _ in range(3):
        # Read first: a store that ignores the create-only precondition (the GCS emulator, some S3 clones)
        # would otherwise let a second holder overwrite a live lease.
        current = _read_lease(location)
        if current is None:
            try:
                lease.version = _write_lease(location, lease.body(expires))
                break
            except _Conflict:
                current = _read_lease(location)
        if current is None:
            continue  # released meanwhile: try to create it again
        held = _holder(current[0])
        if not _is_expired(held):
            raise LockedError(
                f"{location.url} is locked by another ckptctl process ({_describe(held)}, lease object "
                f"{LOCK_NAME})",
                url=location.url,
                hint=f"if no ckptctl is running, the lease expires by itself; or delete {location.url_of(LOCK_NAME)}",
            )
        try:
            lease.version = _write_lease(location, lease.body(expires), match=current[1])
            break
        except _Conflict:
            continue  # renewed or taken by someone else between our read and our write: look again
    else:
        raise LockedError(f"{location.url} is locked by another ckptctl process", url=location.url)
    lease.expires = expires
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew, args=(lease, lease_seconds, stop), name="ckptctl-lease", daemon=True
    )
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join(timeout=min(60.0, lease_seconds))
        if not lease.lost and not renewer.is_alive():
            with contextlib.suppress(Exception):
                _delete_lease(location, lease.version)


def _renew(lease: Lease, lease_seconds: float, stop: threading.Event) -> None:
    """Rewrite the lease with a new expiry every third of its length, each write conditional on the version we
    wrote last; a lease that is no longer ours ends the thread with ``lease.lost_to`` set."""
    interval = max(lease_seconds / 3, 0.05)
    while not stop.wait(interval):
        expires = time.time() + lease_seconds
        try:
            current = _read_lease(lease.location)
            if current is None or _holder(current[0]).get("token") != lease.token:
                lease.lost_to = _describe(_holder(current[0])) if current else "the lease object was removed"
                return
            lease.version = _write_lease(lease.location, lease.body(expires), match=lease.version)
            lease.expires = expires  # only once the store holds it
            lease.last_error = None
        except _Conflict:
            current = _read_lease_quietly(lease.location)
            lease.lost_to = _describe(_holder(current[0])) if current else "the lease object was removed"
            return
        except Exception as exc:  # the store unreachable for a while: try again; ``check`` watches the expiry
            lease.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]


def _read_lease_quietly(location: Location) -> tuple[bytes, object] | None:
    try:
        return _read_lease(location)
    except Exception:
        return None


def _is_expired(lease: dict[str, Any]) -> bool:
    """Past its expiry, or held by a process of this machine's pid namespace that no longer exists (a push
    killed with -9 does not block its own re-run for the rest of the lease)."""
    try:
        if float(lease["expires"]) < time.time():
            return True
    except (KeyError, TypeError, ValueError):
        return False  # not a lease we can read: never taken over (delete it by hand)
    scope, pid = _process_scope(), lease.get("pid")
    if scope is None or lease.get("scope") != scope or type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive (another user's process)
    return False


def _process_scope() -> str | None:
    """Where a pid means one process: this boot of this machine and this pid namespace (containers on one host
    share the boot id but not the pids); None where that cannot be told."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None
