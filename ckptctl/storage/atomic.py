"""Writes that a reader (or a crash) never sees half done, never through a link, with the modes ``open()`` gives.

Local disks: a file is written to a new temporary name in the target's folder, fsynced, renamed over the target,
and the folder is fsynced; a folder is filled under a hidden partial name beside it and renamed into place.
Every file and folder created here is created exclusively (``O_CREAT | O_EXCL``, ``mkdir``) and without following
a link (``O_NOFOLLOW``), so a link or a file someone else put at one of ckptctl's own names is refused
(``UnsafeTargetError``), never written through; a rename replaces a link at the final name, never its target.
Modes are what ``open()`` and ``mkdir`` give under the user's umask (0666 and 0777 masked by it, and by a
folder's default ACL): outputs on a shared cluster are as readable as any other file the user writes.

Object stores have no rename: their writers (``tier push``, ``consolidate`` to a URL) put the data objects first
and the commit object (manifest or index) last, so a reader that trusts only committed units never trusts a
partial one.

``disk_error`` is the one table from a local write failure (full disk, quota, file-size limit, read-only file
system, permission) to a ckptctl error; ``cli/app.py`` ``main`` applies it to whatever reaches it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from typing import IO

from ckptctl.errors import CkptctlError, NoSpaceError, PermissionDeniedError, UnsafeTargetError
from ckptctl.storage.writeback import write_behind_file

TEMP_PREFIX = ".ckptctl-tmp-"
PARTIAL_SUFFIX = ".ckptctl-partial"
FILE_MODE = 0o666
"""What ``open()`` asks for; the kernel takes the umask off."""
FOLDER_MODE = 0o777
_umask: int | None = None


def current_umask() -> int:
    """This process's umask, read without changing it where the kernel tells it (Linux /proc), else by setting
    and restoring it once; cached, so call it first from the main thread (setting it is process-wide: a thread
    creating a file meanwhile would get the wrong mode)."""
    global _umask
    if _umask is None:
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as status:
                _umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _umask = os.umask(0o022)
            os.umask(_umask)
    return _umask


_NEW_FILE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def disk_error(exc: OSError, path: str | None = None) -> CkptctlError | None:
    """The ckptctl error for a local write failure, naming ``path`` (or the file the OS named); None for others.

    A full disk, a quota or a file-size limit (ENOSPC, EDQUOT, EFBIG) is NoSpaceError (exit 1); a read-only file
    system or a refused permission (EROFS, EACCES, EPERM) is PermissionDeniedError (exit 3).
    """
    where = path or (os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes)) else None)
    reason = exc.strerror or os.strerror(exc.errno or 0)
    if exc.errno in _NO_SPACE:
        return NoSpaceError(
            f"no space left while writing {where}: {reason}" if where else f"no space left: {reason}",
            url=where,
            hint="free space (or raise the quota or the file-size limit) and re-run",
        )
    if exc.errno in _NOT_WRITABLE:
        return PermissionDeniedError(
            f"cannot write {where}: {reason}" if where else f"cannot write: {reason}", url=where
        )
    return None


def _raise_mapped(exc: BaseException, path: str) -> None:
    if isinstance(exc, OSError):
        mapped = disk_error(exc, path)
        if mapped is not None:
            raise mapped from exc


def fsync_folder(folder: str) -> None:
    """Make renames in ``folder`` durable (best effort: some file systems refuse to fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unsafe(path: str, what: str) -> UnsafeTargetError:
    return UnsafeTargetError(
        f"{path} {what}; ckptctl never writes through it or removes it",
        url=path,
        hint="remove it yourself if it is not needed, then re-run",
    )


def _describe(info: os.stat_result) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a FIFO, device or socket)"
    return "is already there"


def create_new_file(path: str) -> IO[bytes]:
    """Open a new file for writing: created exclusively, never through a link, mode 0666 less the umask.

    Anything already at ``path`` (a link, a file, a folder) raises UnsafeTargetError and is left as it is.
    """
    try:
        fd = os.open(path, _NEW_FILE_FLAGS, FILE_MODE)
    except FileExistsError:
        raise _unsafe(path, _describe(os.lstat(path))) from None
    return write_behind_file(fd)


@contextlib.contextmanager
def durable_new_file(path: str) -> Iterator[IO[bytes]]:
    """A new file (as ``create_new_file``) to fill in the block: fsynced when it ends, removed if it fails (for
    files inside a partial folder, whose rename is the commit)."""
    handle = create_new_file(path)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


@contextlib.contextmanager
def atomic_local_file(path: str) -> Iterator[IO[bytes]]:
    """Yield a file to write; on success it replaces ``path`` atomically, on failure it is removed.

    The temporary file is new (``O_EXCL | O_NOFOLLOW``) with the mode ``open()`` would give; a link at ``path``
    is replaced, its target left as it was. A full disk or a read-only folder raises the ``disk_error`` naming
    ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = ""
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
            try:
                fd = os.open(tmp, _NEW_FILE_FLAGS, FILE_MODE)
                break
            except FileExistsError:
                continue
        with write_behind_file(fd) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _raise_mapped(exc, path)
        raise
    fsync_folder(folder)


def atomic_write_local(path: str, data: bytes) -> None:
    with atomic_local_file(path) as handle:
        handle.write(data)


# -- folders -----------------------------------------------------------------------------------------------------
def partial_folder(final: str) -> str:
    """Where ``final`` (a folder or a file) is assembled before its rename: ``.<name>.ckptctl-partial`` beside it."""
    final = os.path.abspath(final)
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}{PARTIAL_SUFFIX}")


def prepare_partial_folder(path: str, *, resume: bool) -> None:
    """Make ``path`` a real folder of this user's to fill: created if absent (mode 0777 less the umask); if one is
    there from an interrupted run, kept as it is (``resume``) or emptied. A link, a file, or another user's folder
    in its place raises UnsafeTargetError and is left alone: nothing is written through it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, FOLDER_MODE)
        return
    if not stat.S_ISDIR(info.st_mode):
        what = "is a file, not a partial folder" if stat.S_ISREG(info.st_mode) else _describe(info)
        raise _unsafe(path, what)
    if info.st_uid != os.geteuid():
        raise _unsafe(path, f"belongs to another user (uid {info.st_uid})")
    if not resume:
        shutil.rmtree(path)  # never follows links inside it (fd-based on Linux)
        os.mkdir(path, FOLDER_MODE)


def make_folders_below(root: str, parts: Iterable[str]) -> str:
    """Create the folders ``root/part/...`` one by one, never through a link (``root`` is a folder already checked,
    such as a partial folder); an existing component that is not a real folder raises UnsafeTargetError."""
    path = root
    for part in parts:
        if part in ("", "."):
            continue
        path = os.path.join(path, part)
        try:
            os.mkdir(path, FOLDER_MODE)
        except FileExistsError:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode):
                raise _unsafe(path, _describe(info)) from None
    return path


def remove_no_follow(path: str) -> None:
    """Remove a file, a link (not its target) or a whole folder (never following links inside it)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def commit_folder(temp: str, final: str, *, replace: bool = False) -> None:
    """Rename the filled folder ``temp`` to ``final``, durable once returned. With ``replace`` an existing
    ``final`` is first moved aside (``<temp>.old``) and removed after the rename, so ``final`` is at every moment
    either the old folder or the new one; a link there is replaced, its target left as it was."""
    parent = os.path.dirname(os.path.abspath(final))
    if replace and os.path.lexists(final):
        old = f"{temp}.old"
        if os.path.lexists(old):
            info = os.lstat(old)
            if stat.S_ISDIR(info.st_mode) and info.st_uid != os.geteuid():
                raise _unsafe(old, f"belongs to another user (uid {info.st_uid})")
            remove_no_follow(old)  # left by an interrupted replace: the previous output, already superseded
        os.rename(final, old)
        os.rename(temp, final)
        remove_no_follow(old)
    else:
        os.rename(temp, final)
    fsync_folder(parent)


# -- objects -----------------------------------------------------------------------------------------------------
OBJECT_PART_BYTES = 8 * 1024 * 1024
"""Bytes buffered before a multipart upload sends a part (S3 takes parts of 5 MiB and more): peak memory of
``new_object``."""


@contextlib.contextmanager
def new_object(fs: object, path: str, *, part_bytes: int = OBJECT_PART_BYTES) -> Iterator[IO[bytes]]:
    """Yield a file that streams to the object ``path`` in parts of ``part_bytes``; the object appears only when
    the block ends normally (the multipart upload is completed), and an exception aborts the upload instead, so a
    failed or killed writer never leaves an object that looks complete (an interrupted S3 multipart upload stays
    invisible and is reaped by the bucket's abort-incomplete-uploads rule).

    Buffered files (s3fs, gcsfs) are opened with ``autocommit=False`` and committed after the last part;
    ``memory://`` publishes at open, so there a failure removes the object again.
    """
    from fsspec.spec import AbstractBufferedFile

    handle = fs.open(path, "wb", block_size=part_bytes, autocommit=False)  # type: ignore[attr-defined]
    # Buffered uploads and file:// write aside until commit(); memory:// has no such mode (it publishes now).
    deferred = getattr(handle, "autocommit", True) is False
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(Exception):
            handle.discard()
        if isinstance(handle, AbstractBufferedFile):
            handle.closed = True  # __del__ would otherwise close, i.e. complete, the discarded upload
        if not deferred:
            with contextlib.suppress(Exception):
                fs.rm_file(path)  # type: ignore[attr-defined]
        raise
    handle.close()
    if deferred:
        handle.commit()
