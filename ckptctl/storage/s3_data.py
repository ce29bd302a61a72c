"""The S3 bulk data path: botocore sync clients on threads, with checksums the store itself checks.

s3fs cannot send or read back full-object checksums (s3fs#672) and multiplexes every body on one event loop;
here a botocore client built from what s3fs resolved for the location (credentials, endpoint, region, addressing
style, SSL verification, anonymous access, requester-pays, SSE options) moves the bytes, and s3fs keeps listing,
deleting and small objects. ``request_checksum_calculation="when_required"``: botocore adds no checksum of its
own (several S3-compatible stores refuse its default); ours are computed before the send.

What the store does with checksums is learnt on the first file and kept for the run (``level``):

- ``A``: it stores CRC64NVME (the Put/Complete answer or one HeadObject echoes ours; a store that validates
  refuses a body that does not match it).
- ``B``: it accepts and ignores it. The first file is read back once and hashed; later files carry Content-MD5
  (the store refuses a corrupted body) and are verified by size here and by our digest on pull.
- ``C``: it rejects checksum headers (501 / NotImplemented): that file is sent again as ``B``, and
  ``notes`` says so once.
Payload signing is off unless the options turn it on: every body carries a CRC64NVME or a Content-MD5 instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from ckptctl.errors import ChecksumMismatchError, SourceChangedError, TruncatedError
from ckptctl.storage.checksums import (
    CRC64_BYTES,
    Digest,
    Hasher,
    copy_hashed,
    crc_from_b64,
    digest_of,
    in_order,
    md5_b64,
)
from ckptctl.storage.location import Location

MiB = 2**20
BODY_CHUNK = 8 * MiB
LEVELS = ("A", "B", "C")
_LEVEL_NAMES = {
    "A": "stores CRC64NVME",
    "B": "ignores checksums (Content-MD5, verified on pull)",
    "C": "rejects checksum headers (sent as B)",
}
# Options of botocore's Config that s3fs passes through config_kwargs (aiobotocore adds its own, dropped here).
_CONFIG_KEYS = frozenset(
    {
        "region_name",
        "signature_version",
        "user_agent_extra",
        "connect_timeout",
        "read_timeout",
        "retries",
        "s3",
        "proxies",
        "proxies_config",
        "client_cert",
        "inject_host_prefix",
        "use_dualstack_endpoint",
        "use_fips_endpoint",
        "tcp_keepalive",
        "response_checksum_validation",
        "sigv4a_signing_region_set",
    }
)


def describe_level(level: str | None) -> str:
    """A level in words, for events and status."""
    return _LEVEL_NAMES.get(level or "", "not detected")


@dataclass(frozen=True)
class Sent:
    """One uploaded object: our digest of the bytes read, the store's ETag (an "unchanged since" token), and
    the level it was sent and verified at."""

    digest: Digest
    etag: str | None
    level: str


class S3DataPath:
    """Bulk transfers for one S3 location and one run; thread-safe (one client, a connection per stream)."""

    def __init__(self, location: Location, streams: int = 8) -> None:
        self.location = location
        self.client = build_client(location.fs, streams)
        self.level: str | None = None
        self.notes: list[str] = []
        fs: Any = location.fs
        self._request_payer: dict[str, str] = dict(getattr(fs, "req_kw", {}) or {})
        self._extra: dict[str, Any] = dict(getattr(fs, "s3_additional_kwargs", {}) or {})
        self._cond = threading.Condition()
        self._probing = False

    # -- helpers ------------------------------------------------------------------------------------------------
    def split(self, rel: str) -> tuple[str, str]:
        fs: Any = self.location.fs
        bucket, key, _ = fs.split_path(self.location.full_path(rel))
        return bucket, key

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One request, with requester-pays and the SSE/ACL options from ``-o s3_additional_kwargs`` where the
        operation takes them; a missing key or bucket and a refusal become the OSErrors Location maps."""
        members = self.client.meta.service_model.operation_model(_pascal(operation)).input_shape.members
        extra = {k: v for k, v in {**self._extra, **self._request_payer}.items() if k in members}
        try:
            return dict(getattr(self.client, operation)(**extra, **params))
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(str(exc)) from exc
            if code in ("AccessDenied", "403", "Forbidden"):
                raise PermissionError(str(exc)) from exc
            raise

    def _claim_level(self) -> str | None:
        """The run's level; None when this caller is to detect it (the others wait for its answer)."""
        with self._cond:
            while self.level is None and self._probing:
                self._cond.wait()
            if self.level is None:
                self._probing = True
            return self.level

    def _settle(self, level: str | None) -> None:
        with self._cond:
            if level is not None and self.level is None:
                self.level = level
                if level == "C":
                    self.notes.append(
                        f"{self.location.url}: the store rejects checksum headers; files are sent with "
                        "Content-MD5 and verified by our own digest on pull"
                    )
            self._probing = False
            self._cond.notify_all()

    # -- upload -------------------------------------------------------------------------------------------------
    def upload(
        self, local_path: str, rel: str, *, part_size: int, jobs: int, on_bytes: Callable[[int], None]
    ) -> Sent:
        """Upload one file (one PutObject up to ``part_size``, else a FULL_OBJECT multipart upload), verified as
        its level allows; raises ChecksumMismatchError when the store holds other bytes than were read."""
        claimed = self._claim_level()
        level: str | None = None
        try:
            if claimed in ("B", "C"):
                level = claimed
                return self._send(local_path, rel, part_size, jobs, on_bytes, checksums=False, level=claimed)
            try:
                sent = self._send(local_path, rel, part_size, jobs, on_bytes, checksums=True, level="A")
            except Exception as exc:
                if claimed is not None or not _rejects_checksums(exc):
                    raise
                level = "C"
                return self._send(local_path, rel, part_size, jobs, on_bytes, checksums=False, level="C")
            level = sent.level
            return sent
        finally:
            if claimed is None:
                self._settle(level)

    def _send(
        self,
        local_path: str,
        rel: str,
        part_size: int,
        jobs: int,
        on_bytes: Callable[[int], None],
        *,
        checksums: bool,
        level: str,
    ) -> Sent:
        bucket, key = self.split(rel)
        fd = os.open(local_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            if size <= part_size:
                data = _pread_exact(fd, 0, size, local_path)
                digest = digest_of(data)
                response = self._call(
                    "put_object", Bucket=bucket, Key=key, Body=data, **_body_check(digest, data, checksums)
                )
                on_bytes(size)
            else:
                digest, response = self._multipart(
                    fd, local_path, bucket, key, size, part_size, jobs, on_bytes, checksums
                )
        finally:
            os.close(fd)
        etag = _etag(response)
        if not checksums:
            return Sent(digest, etag, level)
        return Sent(digest, etag, self._verify_stored(rel, bucket, key, digest, response))

    def _multipart(
        self,
        fd: int,
        local_path: str,
        bucket: str,
        key: str,
        size: int,
        part_size: int,
        jobs: int,
        on_bytes: Callable[[int], None],
        checksums: bool,
    ) -> tuple[Digest, dict[str, Any]]:
        create: dict[str, Any] = (
            {"ChecksumAlgorithm": "CRC64NVME", "ChecksumType": "FULL_OBJECT"} if checksums else {}
        )
        upload_id = self._call("create_multipart_upload", Bucket=bucket, Key=key, **create)["UploadId"]

        def send(number: int) -> tuple[Digest, dict[str, Any]]:
            offset = (number - 1) * part_size
            data = _pread_exact(fd, offset, min(part_size, size - offset), local_path)
            digest = digest_of(data)
            response = self._call(
                "upload_part",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                **_body_check(digest, data, checksums),
            )
            on_bytes(len(data))
            part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
            if checksums:
                part["ChecksumCRC64NVME"] = digest.crc64nvme_b64
            return digest, part

        try:
            with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="ckptctl-part") as pool:
                results = list(pool.map(send, range(1, -(-size // part_size) + 1)))
            digest = in_order(d for d, _ in results)
            complete: dict[str, Any] = (
                {
                    "ChecksumCRC64NVME": digest.crc64nvme_b64,
                    "ChecksumType": "FULL_OBJECT",
                    "MpuObjectSize": size,
                }
                if checksums
                else {}
            )
            response = self._call(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [p for _, p in results]},
                **complete,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        return digest, response

    def _verify_stored(
        self, rel: str, bucket: str, key: str, digest: Digest, response: dict[str, Any]
    ) -> str:
        """Level A when the store answers with our CRC64NVME (in the response, else one HeadObject); B when it
        keeps none (then the object is read back once); a different value is a mismatch, never a level."""
        theirs = response.get("ChecksumCRC64NVME") or self.stored_crc64nvme(rel)
        if theirs is None:
            back = self.download(rel, None, size=digest.size)
            if back.digest != digest:
                raise _mismatch(self.location, rel, digest.crc64nvme_b64, back.digest.crc64nvme_b64)
            return "B"
        if crc_from_b64(str(theirs), CRC64_BYTES) != digest.crc64nvme:
            raise _mismatch(self.location, rel, digest.crc64nvme_b64, str(theirs))
        return "A"

    def stored_crc64nvme(self, rel: str) -> str | None:
        """The full-object CRC64NVME the store holds for an object (HeadObject, ChecksumMode=ENABLED), or None
        when it keeps none (or only a composite one, whose value is no file's CRC)."""
        bucket, key = self.split(rel)
        head = self._call("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        value = head.get("ChecksumCRC64NVME")
        if not value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
            return None
        return str(value)

    # -- download -----------------------------------------------------------------------------------------------
    def download(
        self,
        rel: str,
        fd: int | None,
        *,
        size: int,
        range_size: int | None = None,
        md5_part_size: int | None = None,
        jobs: int = 1,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Hasher:
        """Ranged GETs of ``range_size`` bytes on ``jobs`` threads, each written with ``pwrite`` at its offset
        into ``fd`` (None: only hashed) and hashed as it arrives; the ranges' digests are combined in offset
        order (MD5 parts too, when ranges are the v1 part size). One GET when the object fits one range."""
        step = max(1, range_size or size or 1)
        starts = list(range(0, size, step)) or [0]

        def fetch(start: int) -> Hasher:
            end = min(size, start + step)
            hasher = Hasher(md5_part_size)
            write = None if fd is None else (lambda chunk, at: _pwrite_all(fd, chunk, start + at))
            copy_hashed(self._body(rel, start, end, whole=len(starts) == 1), hasher, write, on_bytes)
            if hasher.digest.size != end - start:
                raise TruncatedError(
                    f"{self.location.url_of(rel)}: the store sent {hasher.digest.size} bytes of "
                    f"{end - start} (bytes {start}-{end})"
                )
            return hasher

        if len(starts) == 1:
            return fetch(0)
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="ckptctl-range") as pool:
            futures = [pool.submit(fetch, start) for start in starts]
            wait(futures)  # every range stops writing before the caller closes fd, failure or not
            pieces = [f.result() for f in futures]
        total = pieces[0]
        for piece in pieces[1:]:
            total.digest = total.digest.then(piece.digest)
            total.md5_parts.extend(piece.finish_md5_parts())
        return total

    def _body(self, rel: str, start: int, end: int, *, whole: bool) -> Iterator[bytes]:
        bucket, key = self.split(rel)
        extra = {} if whole else {"Range": f"bytes={start}-{end - 1}"}
        body = self._call("get_object", Bucket=bucket, Key=key, **extra)["Body"]
        try:
            while True:
                block = body.read(BODY_CHUNK)
                if not block:
                    return
                yield block
        finally:
            with contextlib.suppress(Exception):
                body.close()


def build_client(fs: Any, streams: int) -> Any:
    """A botocore sync S3 client with the settings s3fs resolved for ``fs`` (see the module docstring)."""
    from botocore import UNSIGNED
    from botocore.config import Config
    from fsspec.asyn import sync

    aio = fs.connect()
    config_kwargs = {k: v for k, v in fs._prepare_config_kwargs().items() if k in _CONFIG_KEYS}
    s3_config = {"payload_signing_enabled": False, **dict(config_kwargs.pop("s3", None) or {})}
    config_kwargs.update(
        s3=s3_config,
        request_checksum_calculation="when_required",
        max_pool_connections=min(256, max(10, streams * streams)),  # files x ranges of a pull
    )
    client_kwargs: dict[str, Any] = {
        "endpoint_url": aio.meta.endpoint_url,
        "region_name": aio.meta.region_name,
    }
    if "verify" in fs.client_kwargs:
        client_kwargs["verify"] = fs.client_kwargs["verify"]
    if fs.anon:
        config_kwargs["signature_version"] = UNSIGNED
    else:
        credentials = aio._request_signer._credentials  # what s3fs resolved (env, profile, keys, role)
        if credentials is not None:
            frozen = sync(fs.loop, credentials.get_frozen_credentials)
            client_kwargs.update(
                aws_access_key_id=frozen.access_key,
                aws_secret_access_key=frozen.secret_key,
                aws_session_token=frozen.token,
            )
    return _session(fs.kwargs.get("profile")).create_client(
        "s3", config=Config(**config_kwargs), **client_kwargs
    )


@functools.lru_cache(maxsize=8)
def _session(profile: str | None) -> Any:
    """One botocore session per profile and process: a client built from it reuses the loaded S3 model (a new
    session parses it again, ~0.2 CPU s)."""
    import botocore.session

    return botocore.session.Session(profile=profile)


def _pascal(operation: str) -> str:
    return "".join(word.capitalize() for word in operation.split("_"))


def _body_check(digest: Digest, data: bytes, checksums: bool) -> dict[str, str]:
    """What guards a request body: our CRC64NVME (level A), else its Content-MD5."""
    if checksums:
        return {"ChecksumAlgorithm": "CRC64NVME", "ChecksumCRC64NVME": digest.crc64nvme_b64}
    return {"ContentMD5": md5_b64(data)}


def _rejects_checksums(exc: BaseException) -> bool:
    """Whether a store refused a request for carrying checksum headers (level C), not for its content."""
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    error = response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", "")).lower()
    return (
        status == 501
        or code == "NotImplemented"
        or (status == 400 and "checksum" in message and code != "BadDigest")
    )


def _etag(response: dict[str, Any]) -> str | None:
    etag = response.get("ETag")
    return str(etag).strip('"') if etag else None


def _mismatch(location: Location, rel: str, ours: str, theirs: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{location.url_of(rel)}: the store holds CRC64NVME {theirs}, we sent {ours}",
        url=location.url_of(rel),
    )


def _pread_exact(fd: int, offset: int, length: int, path: str) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:  # pread may return less than asked (large reads, signals)
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise SourceChangedError(f"{path} shrank while it was being uploaded")
        data += more
    return data


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
