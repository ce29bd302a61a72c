"""File digests: full-object CRC64NVME and CRC32C from one read of the bytes, and the MD5 ETag of v1 manifests.

Both CRCs are what the stores print for a whole object (S3 ``ChecksumCRC64NVME`` with ``ChecksumType=FULL_OBJECT``,
GCS ``crc32c``): base64 of the big-endian value. CRCs of adjacent pieces combine exactly (``Digest.then``), so a
file hashed in parts or ranges, in any order of arrival, gets the value of one pass, whatever the part size.
awscrt hashes at ~20-28 GiB/s a core (both CRCs cost ~0.09 CPU s/GiB together) and releases the GIL above
5 KiB; MD5 (~1.2 s/GiB) is computed only to check objects pushed with a v1 manifest, or for Content-MD5 on stores
that ignore CRC headers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ckptctl.errors import BackendNotInstalledError

try:
    from awscrt import checksums as _crt
except ImportError as exc:  # imported by the commands that move data, never by --help
    raise BackendNotInstalledError(
        f"ckptctl hashes transfers with awscrt, which is not installed ({exc})",
        hint="pip install 'awscrt>=0.31.2' (a dependency of ckptctl; this environment lacks it)",
    ) from exc

CRC64_BYTES = 8
CRC32C_BYTES = 4
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Digest:
    """Size and both CRCs of a run of bytes."""

    size: int = 0
    crc64nvme: int = 0
    crc32c: int = 0

    def then(self, after: Digest) -> Digest:
        """The digest of these bytes followed by ``after``'s (no data re-read: ~0.2 µs)."""
        return Digest(
            self.size + after.size,
            _crt.combine_crc64nvme(self.crc64nvme, after.crc64nvme, after.size),
            _crt.combine_crc32c(self.crc32c, after.crc32c, after.size),
        )

    @property
    def crc64nvme_b64(self) -> str:
        return crc_to_b64(self.crc64nvme, CRC64_BYTES)

    @property
    def crc32c_b64(self) -> str:
        return crc_to_b64(self.crc32c, CRC32C_BYTES)


def digest_of(data: Buffer) -> Digest:
    """The digest of one buffer."""
    return Digest(len(data), _crt.crc64nvme(data), _crt.crc32c(data))


def in_order(pieces: Iterable[Digest]) -> Digest:
    """Adjacent pieces (in file order) folded into the digest of the whole."""
    total = Digest()
    for piece in pieces:
        total = total.then(piece)
    return total


def crc_to_b64(value: int, width: int) -> str:
    """A CRC as S3 and GCS print it: base64 of its big-endian bytes."""
    return base64.b64encode(value.to_bytes(width, "big")).decode()


def crc_from_b64(text: str, width: int) -> int | None:
    """The CRC printed as ``text`` (see ``crc_to_b64``); None when it is not one of that width."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return int.from_bytes(raw, "big") if len(raw) == width else None


def md5_b64(data: Buffer) -> str:
    """Content-MD5 of a request body (for stores that validate that and ignore CRC headers)."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def etag_of_parts(parts: list[bytes]) -> str:
    """S3's ETag for these part MD5s: the MD5 itself for one part, ``md5(concat)-N`` for several."""
    if len(parts) == 1:
        return parts[0].hex()
    return f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"


def copy_hashed(
    chunks: Iterable[Buffer],
    hasher: Hasher,
    write: Callable[[Buffer, int], object] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Hasher:
    """The one loop that hashes bytes while they move: each chunk is hashed, then written at its offset from
    the start of ``chunks`` (``write=None``: only hashed), then counted. Returns ``hasher``."""
    offset = 0
    for chunk in chunks:
        hasher.update(chunk)
        if write is not None:
            write(chunk, offset)
        offset += len(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))
    return hasher


class Hasher:
    """Fed the bytes of a file (or of a range that starts at a part boundary) in order, with any chunking.

    Always the two CRCs; with ``md5_part_size`` (v1 manifests only) also the MD5 of each part of that size
    (0: one MD5 of everything), from which ``etag`` gives the v1 digest.
    """

    def __init__(self, md5_part_size: int | None = None) -> None:
        self.digest = Digest()
        self._md5_part_size = md5_part_size
        self._md5 = hashlib.md5(usedforsecurity=False) if md5_part_size is not None else None
        self._md5_fill = 0
        self.md5_parts: list[bytes] = []

    def update(self, data: Buffer) -> None:
        self.digest = Digest(
            self.digest.size + len(data),
            _crt.crc64nvme(data, self.digest.crc64nvme),
            _crt.crc32c(data, self.digest.crc32c),
        )
        if self._md5 is not None:
            self._update_md5(memoryview(data))

    def _update_md5(self, view: memoryview) -> None:
        assert self._md5 is not None
        if not self._md5_part_size:
            self._md5.update(view)
            return
        while view:
            take = min(len(view), self._md5_part_size - self._md5_fill)
            self._md5.update(view[:take])
            self._md5_fill += take
            view = view[take:]
            if self._md5_fill == self._md5_part_size:
                self.md5_parts.append(self._md5.digest())
                self._md5 = hashlib.md5(usedforsecurity=False)
                self._md5_fill = 0

    def finish_md5_parts(self) -> list[bytes]:
        """Every part's MD5, the last (short) one included; call once, after the last update."""
        if self._md5 is not None and (self._md5_fill or not self.md5_parts or not self._md5_part_size):
            self.md5_parts.append(self._md5.digest())
            self._md5 = None
        return self.md5_parts

    @property
    def etag(self) -> str:
        """The v1 digest: the file's MD5 (no part size) or ``md5(part md5s)-N``; after the last update."""
        return etag_of_parts(self.finish_md5_parts())
