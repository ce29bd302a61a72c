"""Writes that a reader (or a crash) never sees half done.

Local disks: temporary file in the target's folder, fsync, rename over the target, fsync the folder.
Object stores: data objects first, the commit object (manifest or index) last, so a reader that trusts only
committed units never trusts a partial one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from ckptctl.storage.location import Location

TEMP_PREFIX = ".ckptctl-tmp-"


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_local_file(path: str) -> Iterator[IO[bytes]]:
    """Yield a file to write; on success it replaces ``path`` atomically, on failure it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_local(path: str, data: bytes) -> None:
    with atomic_local_file(path) as handle:
        handle.write(data)


def write_then_commit(
    location: Location, files: dict[str, bytes], commit_rel: str, commit_data: bytes
) -> None:
    """Write every data file, then the commit file last.

    Readers that look for ``commit_rel`` before trusting the rest never see a partial set, on any backend.
    """
    for rel, data in files.items():
        location.write_bytes(rel, data)
    location.write_bytes(commit_rel, commit_data)
