"""``storage.checksums``: the CRCs S3 and GCS print, their combine, the v1 MD5 ETag, and the one copy loop."""

from __future__ import annotations

import base64
import hashlib
import os

import crc32c
import pytest

from ckptctl.storage import checksums

MiB = 2**20


def test_crc32c_is_the_value_gcs_prints() -> None:
    data = os.urandom(100_003)
    expected = base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()
    assert checksums.digest_of(data).crc32c_b64 == expected


def test_crc64nvme_known_value() -> None:
    # The CRC-64/NVME check value (CRC catalogue: "123456789" -> 0xAE8B14860A799888).
    assert checksums.digest_of(b"123456789").crc64nvme == 0xAE8B14860A799888


@pytest.mark.parametrize("cut", [0, 1, 5 * MiB, 5 * MiB + 7])
def test_pieces_combine_into_the_whole(cut: int) -> None:
    data = os.urandom(11 * MiB + 3)
    whole = checksums.digest_of(data)
    assert checksums.digest_of(data[:cut]).then(checksums.digest_of(data[cut:])) == whole
    parts = [checksums.digest_of(data[i : i + 5 * MiB]) for i in range(0, len(data), 5 * MiB)]
    assert checksums.in_order(parts) == whole and checksums.in_order([]) == checksums.Digest()


@pytest.mark.parametrize("part_size", [0, 5 * MiB])
def test_one_pass_gives_both_crcs_and_the_v1_etag(part_size: int) -> None:
    data = os.urandom(12 * MiB)
    chunks = [data[i : i + 3 * MiB + 1] for i in range(0, len(data), 3 * MiB + 1)]
    written = bytearray(len(data))

    def write(chunk: bytes, at: int) -> None:
        written[at : at + len(chunk)] = chunk

    seen: list[int] = []
    hasher = checksums.copy_hashed(chunks, checksums.Hasher(part_size), write, seen.append)
    assert bytes(written) == data and sum(seen) == len(data)
    assert hasher.digest == checksums.digest_of(data)
    if part_size:
        md5s = [hashlib.md5(data[i : i + part_size]).digest() for i in range(0, len(data), part_size)]
        assert hasher.etag == f"{hashlib.md5(b''.join(md5s)).hexdigest()}-3"
    else:
        assert hasher.etag == hashlib.md5(data).hexdigest()


def test_base64_crcs_are_checked_for_width() -> None:
    value = checksums.digest_of(b"x")
    assert checksums.crc_from_b64(value.crc64nvme_b64, checksums.CRC64_BYTES) == value.crc64nvme
    assert checksums.crc_from_b64(value.crc32c_b64, checksums.CRC64_BYTES) is None
    assert checksums.crc_from_b64("not base64!", checksums.CRC32C_BYTES) is None
    assert checksums.crc_from_b64("é", checksums.CRC32C_BYTES) is None
