"""Whole-file transfers between a local disk and a location, hashed while the bytes pass (never a second read).

Every file gets one digest (``storage.checksums``): its size, full-object CRC64NVME and CRC32C, the values S3 and
GCS print for the whole object whatever the part size, computed from the one buffer each chunk passes through
(``copy_hashed``, the only loop that hashes while it copies). Files pushed with a v1 manifest (MD5, S3-ETag-shaped
for parts of a recorded size) are still checked by that MD5 when they are pulled.

S3: bulk bytes go through ``storage.s3_data`` (botocore sync clients on threads: a PutObject or a FULL_OBJECT
CRC64NVME multipart upload, resumed after a killed push, ranged GETs written with ``pwrite``); the store's level of
checksum support is probed before the first file. Other stores are written by one stream through ``fs.open`` (GCS: resumable upload in 64 MiB
chunks, visible only when finalised), local folders through a temporary name and a rename, and read by one
streaming GET.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptctl.errors import ChecksumMismatchError
from ckptctl.storage.atomic import create_new_file
from ckptctl.storage.checksums import Digest, Hasher, copy_hashed
from ckptctl.storage.location import FileEntry, Location
from ckptctl.storage.writeback import write_at

if TYPE_CHECKING:
    from ckptctl.storage.s3_data import S3DataPath

MiB = 2**20
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum number of parts
STREAM_CHUNK = 8 * MiB
LOCAL_CHUNK = MiB
"""A local file is read this much at a time: larger reads each map fresh memory whose pages fault in (a 1 GiB
file hashes in 0.33 s in 8 MiB reads, 0.23 s in 1 MiB ones)."""
MIN_RANGE = 32 * MiB
"""Ranged GETs of a pull are at least this long (AWS advises 8-16 MB and up; fewer requests cost less CPU)."""

ByteCallback = Callable[[int], None]


def _ignore(_: int) -> None:
    return None


def is_s3(location: Location) -> bool:
    return location.protocol in ("s3", "s3a")


def part_size_for(location: Location, size: int, wanted: int = DEFAULT_PART_SIZE) -> int | None:
    """The part size a file of ``size`` bytes is uploaded with: None off S3 (one stream)."""
    if not is_s3(location):
        return None
    part = max(wanted, MIN_PART_SIZE)
    while -(-size // part) > MAX_PARTS:
        part *= 2
    return part


def open_data_path(location: Location, streams: int, probe_rel: str | None = None) -> S3DataPath | None:
    """The run's S3 data path for ``location`` (None off S3): one per push or pull, so the store's checksum
    level is probed once (on an object at ``probe_rel``; default: ``s3_data.PROBE_REL``)."""
    if not is_s3(location):
        return None
    from ckptctl.storage.s3_data import PROBE_REL, S3DataPath

    with location.errors():
        return S3DataPath(location, streams, probe_rel or PROBE_REL)


def open_local(path: str) -> BinaryIO:
    """A local file opened for reading without following a link: one swapped in after the scan saw a regular
    file there raises ELOOP instead of sending what it points to."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    return os.fdopen(fd, "rb")


def local_chunks(path: str, size: int = LOCAL_CHUNK) -> Iterator[bytes]:
    """A local file in chunks, read once (``open_local``)."""
    with open_local(path) as handle:
        while chunk := handle.read(size):
            yield chunk


def digest_local_file(
    path: str, md5_part_size: int | None = None, on_bytes: ByteCallback = _ignore
) -> Hasher:
    """Hash a local file (a pulled file left by an interrupted pull, a file the store may already hold)."""
    return copy_hashed(local_chunks(path), Hasher(md5_part_size), on_bytes=on_bytes)


def store_md5_digest(entry: FileEntry, part_size: int | None) -> str | None:
    """The MD5-shaped digest the store reports for an object (v1 manifests), when comparable with ours; else None.

    S3: the ETag, when it has the form of an MD5 (not for SSE-KMS objects or stores that use other ETags).
    GCS: ``md5Hash`` (absent on composite objects). Local folders and memory:// report nothing.
    """
    if entry.checksum and entry.checksum.startswith("md5:") and part_size is None:
        import base64

        try:
            return base64.b64decode(entry.checksum[4:]).hex()
        except ValueError:
            return None
    etag = entry.etag
    if etag and _looks_like_md5_etag(etag):
        return etag.lower()
    return None


def _looks_like_md5_etag(etag: str) -> bool:
    head, _, parts = etag.partition("-")
    return (
        len(head) == 32
        and all(c in "0123456789abcdefABCDEF" for c in head)
        and (not parts or parts.isdigit())
    )


def reread(
    location: Location, rel: str, size: int, md5_part_size: int | None = None, data: S3DataPath | None = None
) -> Hasher:
    """Hash an object by reading it back (for stores that report no checksum we can compare)."""
    with location.errors(rel):
        if is_s3(location):
            data = data or open_data_path(location, 1)
            assert data is not None
            return data.download(rel, None, size=size, md5_part_size=md5_part_size)
        return copy_hashed(_remote_chunks(location, rel), Hasher(md5_part_size))


def stored_checksum(location: Location, rel: str, data: S3DataPath | None = None) -> tuple[str, str] | None:
    """The full-object checksum a store keeps for an object, as (``crc64nvme`` | ``crc32c``, base64): S3's by
    one HeadObject with ChecksumMode (None at levels B/C), GCS's from a fresh ``info``; None elsewhere."""
    if location.is_local or location.protocol == "memory":
        return None
    with location.errors(rel):
        if is_s3(location):
            data = data or open_data_path(location, 1)
            assert data is not None
            value = data.stored_crc64nvme(rel)
            return None if value is None else ("crc64nvme", value)
        path = location.full_path(rel)
        location.fs.invalidate_cache(path)
        crc = location.fs.info(path).get("crc32c")
    return None if not crc else ("crc32c", str(crc))


@dataclass(frozen=True)
class Uploaded:
    rel: str
    digest: Digest
    part_size: int | None
    etag: str | None = None
    """The store's ETag after the upload: the object is unchanged since it was verified while it still has it."""
    level: str | None = None
    """S3 only: the store's checksum level (``storage.s3_data``)."""

    @property
    def size(self) -> int:
        return self.digest.size


def upload(
    local_path: str,
    location: Location,
    rel: str,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    jobs: int = 4,
    on_bytes: ByteCallback = _ignore,
    data: S3DataPath | None = None,
) -> Uploaded:
    """Upload one file, hashing as it is read; raises ChecksumMismatchError when the store disagrees."""
    size = os.lstat(local_path).st_size
    parts = part_size_for(location, size, part_size)
    with location.errors(rel):
        if is_s3(location):
            data = data or open_data_path(location, jobs)
            assert data is not None and parts is not None
            sent = data.upload(local_path, rel, part_size=parts, jobs=jobs, on_bytes=on_bytes)
            return Uploaded(rel, sent.digest, parts if size > parts else None, sent.etag, sent.level)
        hasher = Hasher()
        with open_local(local_path) as source:  # before the target: a refused source writes nothing
            if location.is_local:
                from ckptctl.storage.atomic import atomic_local_file

                target = atomic_local_file(location.full_path(rel))
            else:
                # GCS: one resumable upload in 64 MiB chunks (bigger chunks are faster on the emulator and on
                # GCS), made visible only when the last chunk finalises it; discarded if reading fails.
                target = location.fs.open(location.full_path(rel), "wb", block_size=64 * MiB)
            with target as sink:
                chunks = iter(lambda: source.read(STREAM_CHUNK), b"")
                try:
                    copy_hashed(chunks, hasher, lambda chunk, _: sink.write(chunk), on_bytes)
                except BaseException:
                    if not location.is_local:
                        with contextlib.suppress(Exception):
                            sink.discard()  # type: ignore[attr-defined]  # gcsfs cancels the resumable upload
                    raise
    if location.is_local:
        return Uploaded(rel, hasher.digest, None)
    etag, level = _check_stored(location, rel, hasher.digest)
    return Uploaded(rel, hasher.digest, None, etag, level)


def _check_stored(location: Location, rel: str, digest: Digest) -> tuple[str | None, str | None]:
    """What was just written, checked once: its ETag, and its CRC32C compared with ours where the store keeps
    one (GCS: level ``crc32c``); a store that keeps none (memory://) gives level None."""
    held = stored_checksum(location, rel)
    if held is not None and held[1] != digest.crc32c_b64:
        raise ChecksumMismatchError(
            f"{location.url_of(rel)}: the store holds CRC32C {held[1]}, we sent {digest.crc32c_b64}",
            url=location.url_of(rel),
        )
    return location.stat(rel).etag, None if held is None else "crc32c"


MAX_UPLOAD_PAGES = 100
"""ListMultipartUploads pages (1,000 uploads each) read at most: a bound on a bucket nobody ever cleaned."""


@dataclass(frozen=True)
class PendingUpload:
    """An S3 multipart upload started and never completed or aborted: its parts are billed until an abort."""

    rel: str
    """The key it was going to write, relative to the location."""
    upload_id: str
    initiated: float | None


def _upload_prefix(location: Location, rel_prefix: str) -> tuple[str, str]:
    """Bucket and key prefix of ``rel_prefix`` (a folder when it ends with ``/``, or is the whole location)."""
    fs: Any = location.fs
    bucket, key, _ = fs.split_path(location.full_path(rel_prefix))
    if not rel_prefix or rel_prefix.endswith("/"):
        key = f"{key.rstrip('/')}/" if key else ""
    return bucket, key


def pending_uploads(location: Location, rel_prefix: str = "") -> list[PendingUpload]:
    """Multipart uploads under ``rel_prefix`` (a folder when it ends with ``/``; ``""``: the whole location),
    one ListMultipartUploads request per 1,000. Only S3 keeps such uploads across processes: [] elsewhere."""
    if not is_s3(location):
        return []
    fs: Any = location.fs
    bucket, key = _upload_prefix(location, rel_prefix)
    base = fs.split_path(location.full_path())[1].rstrip("/")
    found: list[PendingUpload] = []
    markers: dict[str, str] = {}
    with location.errors(rel_prefix):
        for _ in range(MAX_UPLOAD_PAGES):
            page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **markers)
            for upload in page.get("Uploads", []) or []:
                started = upload.get("Initiated")
                name = str(upload["Key"])
                found.append(
                    PendingUpload(
                        name[len(base) + 1 :] if base else name,
                        str(upload["UploadId"]),
                        started.timestamp() if hasattr(started, "timestamp") else None,
                    )
                )
            if not page.get("IsTruncated"):
                break
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }
    return found


def abort_stale_uploads(location: Location, rel_prefix: str) -> int:
    """Abort multipart uploads left under ``rel_prefix`` by an interrupted push (they bill until aborted).

    Spared: an upload this tool started for a local file that has not changed since (``s3_data.resumable``):
    the upload of that file that follows checks its parts against the local bytes and resumes it, or aborts it.
    Any other upload (a file changed since, one nobody recorded, someone else's) is aborted as before."""
    if not is_s3(location):
        return 0
    from ckptctl.storage.s3_data import UploadRecord, resumable, store_endpoint

    stale = pending_uploads(location, rel_prefix)
    fs: Any = location.fs
    bucket, prefix = _upload_prefix(location, rel_prefix)
    aborted = 0
    with location.errors(rel_prefix):
        endpoint = store_endpoint(fs)
        UploadRecord.sweep(endpoint, bucket, prefix, {u.upload_id for u in stale})
        for upload in stale:
            key = fs.split_path(location.full_path(upload.rel))[1]
            if resumable(endpoint, bucket, key, upload.upload_id):
                continue
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id)
            UploadRecord.forget(endpoint, bucket, key, upload.upload_id)
            aborted += 1
    return aborted


def download(
    location: Location,
    rel: str,
    local_path: str,
    *,
    size: int,
    md5_part_size: int | None = None,
    on_bytes: ByteCallback = _ignore,
    jobs: int = 1,
    data: S3DataPath | None = None,
) -> Hasher:
    """Write an object to ``local_path`` (a new file: created exclusively, never through a link, with the mode
    ``open()`` gives, fsync'ed), hashing what is written; returns the hasher.

    S3: ranged GETs on ``jobs`` threads into the preallocated file, ranges of the v1 part size when the MD5 of
    parts is wanted, else one range per stream (at least ``MIN_RANGE``). Other stores: one streaming GET.
    """
    with location.errors(rel), create_new_file(local_path) as sink:
        if is_s3(location):
            data = data or open_data_path(location, jobs)
            assert data is not None
            sink.truncate(size)
            span = md5_part_size or max(MIN_RANGE, -(-size // max(1, jobs)))
            hasher = data.download(
                rel,
                sink.fileno(),
                size=size,
                range_size=span,
                md5_part_size=md5_part_size,
                jobs=jobs,
                on_bytes=on_bytes,
            )
        else:
            hasher = Hasher(md5_part_size)
            fd = sink.fileno()
            copy_hashed(
                _remote_chunks(location, rel), hasher, lambda chunk, at: write_at(fd, chunk, at), on_bytes
            )
        os.fsync(sink.fileno())
    return hasher


def _remote_chunks(location: Location, rel: str) -> Iterator[bytes]:
    path = location.full_path(rel)
    if location.is_local:
        yield from local_chunks(path)
        return
    with location.fs.open(path, "rb", block_size=STREAM_CHUNK, cache_type="none") as handle:
        yield from iter(lambda: handle.read(STREAM_CHUNK), b"")
