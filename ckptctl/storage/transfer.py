"""Whole-file transfers between a local disk and a location, hashed while the bytes pass (never a second read).

Every file gets one digest, in the form S3 gives as an ETag: the MD5 of the file when it fits in one part, else
``md5(part md5s)-N`` for parts of a fixed, recorded size. The same value is what S3 reports for our uploads (we
choose the part size), what GCS reports as ``md5Hash`` (one part: uploads to other stores use no parts), and what a
download recomputes as it writes, so one number is checked at every step.

S3 uploads are our own multipart uploads over s3fs's client (parts in parallel, each with its Content-MD5), because
s3fs ``put_file`` reads waves of 50 MiB parts and aborts everything on a retry; other stores are written by one
stream through ``fs.open`` (GCS: resumable upload, made visible only when finalised), local folders through a
temporary name and a rename. A download of an S3 object uploaded in parts is fetched as ranged GETs of those
parts in parallel, written in place and hashed part by part (the digest needs no order between parts); other
objects are one streaming GET. Each GET body is read on s3fs's event loop in 8 MiB blocks: one hop between threads
per block, not one per network read.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import IO, Any

from ckptctl.errors import ChecksumMismatchError, CkptctlError
from ckptctl.storage.atomic import create_new_file
from ckptctl.storage.location import FileEntry, Location

MiB = 2**20
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum number of parts
STREAM_CHUNK = 8 * MiB

ByteCallback = Callable[[int], None]


def _ignore(_: int) -> None:
    return None


class StreamHasher:
    """The file digest (see the module docstring), fed in order with any chunking."""

    def __init__(self, part_size: int | None) -> None:
        self.part_size = part_size
        self._whole = hashlib.md5(usedforsecurity=False)
        self._part = hashlib.md5(usedforsecurity=False)
        self._part_fill = 0
        self._parts: list[bytes] = []
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.part_size is None:
            self._whole.update(data)
            return
        view = memoryview(data)
        while view:
            take = min(len(view), self.part_size - self._part_fill)
            self._part.update(view[:take])
            self._part_fill += take
            view = view[take:]
            if self._part_fill == self.part_size:
                self._parts.append(self._part.digest())
                self._part = hashlib.md5(usedforsecurity=False)
                self._part_fill = 0

    def hexdigest(self) -> str:
        if self.part_size is None:
            return self._whole.hexdigest()
        parts = list(self._parts)
        if self._part_fill or not parts:
            parts.append(self._part.digest())
        return combine_part_digests(parts)


def combine_part_digests(parts: list[bytes]) -> str:
    """S3's ETag for these part MD5s: the MD5 itself for one part, ``md5(concat)-N`` for several."""
    if len(parts) == 1:
        return parts[0].hex()
    return f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"


def is_s3(location: Location) -> bool:
    return location.protocol in ("s3", "s3a")


def part_size_for(location: Location, size: int, wanted: int = DEFAULT_PART_SIZE) -> int | None:
    """The part size a file of ``size`` bytes is uploaded (and digested) with: None (one MD5) off S3."""
    if not is_s3(location):
        return None
    part = max(wanted, MIN_PART_SIZE)
    while -(-size // part) > MAX_PARTS:
        part *= 2
    return part


def digest_local_file(path: str, part_size: int | None, on_bytes: ByteCallback = _ignore) -> str:
    hasher = StreamHasher(part_size)
    with open(path, "rb") as handle:
        for chunk in _chunks(handle):
            hasher.update(chunk)
            on_bytes(len(chunk))
    return hasher.hexdigest()


def _chunks(handle: IO[bytes], size: int = STREAM_CHUNK) -> Iterator[bytes]:
    while True:
        chunk = handle.read(size)
        if not chunk:
            return
        yield chunk


def store_digest(entry: FileEntry, part_size: int | None) -> str | None:
    """The digest the store itself reports for an object, when it is comparable with ours; else None.

    S3: the ETag, when it has the form of an MD5 (not for SSE-KMS objects or stores that use other ETags).
    GCS: ``md5Hash`` (absent on composite objects). Local folders and memory:// report nothing.
    """
    if entry.checksum and entry.checksum.startswith("md5:") and part_size is None:
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


def reread_digest(location: Location, rel: str, part_size: int | None) -> str:
    """Digest an object by reading it back (for stores that report no checksum)."""
    hasher = StreamHasher(part_size)
    for chunk in _remote_chunks(location, rel):
        hasher.update(chunk)
    return hasher.hexdigest()


@dataclass(frozen=True)
class Uploaded:
    rel: str
    size: int
    digest: str
    part_size: int | None


def upload(
    local_path: str,
    location: Location,
    rel: str,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    jobs: int = 4,
    on_bytes: ByteCallback = _ignore,
) -> Uploaded:
    """Upload one file, hashing as it is read; raises ChecksumMismatchError when the store disagrees."""
    size = os.path.getsize(local_path)
    parts = part_size_for(location, size, part_size)
    with location.errors(rel):
        if is_s3(location):
            digest = _upload_s3(local_path, location, rel, size, parts or DEFAULT_PART_SIZE, jobs, on_bytes)
        elif location.is_local:
            digest = _upload_local(local_path, location, rel, on_bytes)
        else:
            digest = _upload_stream(local_path, location, rel, on_bytes)
    return Uploaded(rel, size, digest, parts)


def _upload_local(local_path: str, location: Location, rel: str, on_bytes: ByteCallback) -> str:
    from ckptctl.storage.atomic import atomic_local_file

    hasher = StreamHasher(None)
    with open(local_path, "rb") as source, atomic_local_file(location.full_path(rel)) as sink:
        for chunk in _chunks(source):
            hasher.update(chunk)
            sink.write(chunk)
            on_bytes(len(chunk))
    return hasher.hexdigest()


def _upload_stream(local_path: str, location: Location, rel: str, on_bytes: ByteCallback) -> str:
    hasher = StreamHasher(None)
    # GCS: one resumable upload in 64 MiB chunks (bigger chunks are faster on the emulator and on GCS), made
    # visible only when the last chunk finalises it.
    with (
        open(local_path, "rb") as source,
        location.fs.open(location.full_path(rel), "wb", block_size=64 * MiB) as sink,
    ):
        for chunk in _chunks(source):
            hasher.update(chunk)
            sink.write(chunk)
            on_bytes(len(chunk))
    return hasher.hexdigest()


def _mismatch(location: Location, rel: str, ours: str, theirs: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{location.url_of(rel)}: the store holds digest {theirs}, we sent {ours}", url=location.url_of(rel)
    )


def _read_part(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise CkptctlError(f"{path} shrank while it was being uploaded")
    return data


def _upload_s3(
    local_path: str,
    location: Location,
    rel: str,
    size: int,
    part_size: int,
    jobs: int,
    on_bytes: ByteCallback,
) -> str:
    fs: Any = location.fs
    bucket, key, _ = fs.split_path(location.full_path(rel))
    if size <= part_size:
        data = _read_part(local_path, 0, size)
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        response = fs.call_s3(
            "put_object", Bucket=bucket, Key=key, Body=data, ContentMD5=base64.b64encode(md5).decode()
        )
        on_bytes(size)
        etag = str(response.get("ETag", "")).strip('"')
        if _looks_like_md5_etag(etag) and etag.lower() != md5.hex():
            raise _mismatch(location, rel, md5.hex(), etag)
        return md5.hex()
    # CRC32 per part: S3 checks each part against it on arrival, and moto completes such uploads 3-5x faster.
    upload_id = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")[
        "UploadId"
    ]
    count = -(-size // part_size)

    def send(number: int) -> tuple[bytes, dict[str, Any]]:
        offset = (number - 1) * part_size
        data = _read_part(local_path, offset, min(part_size, size - offset))
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        response = fs.call_s3(
            "upload_part",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ContentMD5=base64.b64encode(md5).decode(),
            ChecksumAlgorithm="CRC32",
        )
        on_bytes(len(data))
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if response.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return md5, part

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="ckptctl-part") as pool:
            results = list(pool.map(send, range(1, count + 1)))
        digest = combine_part_digests([md5 for md5, _ in results])
        response = fs.call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [part for _, part in results]},
        )
    except BaseException:
        with contextlib.suppress(Exception):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    etag = str(response.get("ETag", "")).strip('"')
    if _looks_like_md5_etag(etag) and etag.lower() != digest:
        raise _mismatch(location, rel, digest, etag)
    return digest


def abort_stale_uploads(location: Location, rel_prefix: str) -> int:
    """Abort multipart uploads left under ``rel_prefix`` by an interrupted push (they bill until aborted).

    Only S3 keeps such uploads across processes; other stores drop an unfinished upload by themselves.
    """
    if not is_s3(location):
        return 0
    fs: Any = location.fs
    bucket, key, _ = fs.split_path(location.full_path(rel_prefix))
    aborted = 0
    with location.errors(rel_prefix):
        listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for upload_info in listing.get("Uploads", []) or []:
            fs.call_s3(
                "abort_multipart_upload",
                Bucket=bucket,
                Key=upload_info["Key"],
                UploadId=upload_info["UploadId"],
            )
            aborted += 1
    return aborted


def download(
    location: Location,
    rel: str,
    local_path: str,
    *,
    size: int,
    part_size: int | None,
    on_bytes: ByteCallback = _ignore,
    parts_pool: Executor | None = None,
) -> str:
    """Write an object to ``local_path`` (a new file: created exclusively, never through a link, with the mode
    ``open()`` gives), hashing what is written; returns the digest.

    With ``parts_pool``, an S3 object of several parts is fetched part by part on that pool.
    """
    if parts_pool is not None and is_s3(location) and part_size and size > part_size:
        return _download_s3_parts(location, rel, local_path, size, part_size, parts_pool, on_bytes)
    hasher = StreamHasher(part_size)
    with create_new_file(local_path) as sink:
        for chunk in _remote_chunks(location, rel):
            hasher.update(chunk)
            sink.write(chunk)
            on_bytes(len(chunk))
        sink.flush()
        os.fsync(sink.fileno())
    return hasher.hexdigest()


def _download_s3_parts(
    location: Location,
    rel: str,
    local_path: str,
    size: int,
    part_size: int,
    pool: Executor,
    on_bytes: ByteCallback,
) -> str:
    path = location.full_path(rel)
    with create_new_file(local_path) as sink:
        sink.truncate(size)
        fd = sink.fileno()

        def fetch(start: int) -> bytes:
            end = min(size, start + part_size)
            digest = hashlib.md5(usedforsecurity=False)
            offset = start
            for block in _s3_stream(location, path, (start, end)):
                digest.update(block)
                _pwrite_all(fd, block, offset)
                offset += len(block)
                on_bytes(len(block))
            if offset != end:
                raise CkptctlError(
                    f"{location.url_of(rel)}: the store sent {offset - start} bytes of a "
                    f"{end - start}-byte part"
                )
            return digest.digest()

        futures = [pool.submit(fetch, start) for start in range(0, size, part_size)]
        # Every part must have stopped writing before the file descriptor is closed, failure or not.
        wait(futures)
        with location.errors(rel):
            digests = [future.result() for future in futures]
        os.fsync(fd)
    return combine_part_digests(digests)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _remote_chunks(location: Location, rel: str) -> Iterator[bytes]:
    path = location.full_path(rel)
    with location.errors(rel):
        if location.is_local:
            with open(path, "rb") as handle:
                yield from _chunks(handle)
            return
        if is_s3(location):
            yield from _s3_stream(location, path)
            return
        with location.fs.open(path, "rb", block_size=STREAM_CHUNK, cache_type="none") as handle:
            yield from _chunks(handle)


def _s3_stream(location: Location, path: str, byte_range: tuple[int, int] | None = None) -> Iterator[bytes]:
    """One GET (of ``[start, end)`` when given) streamed in blocks, each block gathered on s3fs's event loop."""
    from fsspec.asyn import sync

    fs: Any = location.fs
    bucket, key, version = fs.split_path(path)
    extra: dict[str, str] = {"VersionId": version} if version else {}
    if byte_range:
        extra["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
    response = sync(fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key, **extra)
    body = response["Body"]
    try:
        while True:
            block = sync(fs.loop, _read_block, body, STREAM_CHUNK)
            if not block:
                return
            yield block
    finally:
        with contextlib.suppress(Exception):
            body.close()


async def _read_block(body: Any, size: int) -> bytes:
    """Up to ``size`` bytes of a response body: a body read returns what the socket had, often only 64 KiB."""
    pieces: list[bytes] = []
    got = 0
    while got < size:
        piece = await body.read(size - got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)
