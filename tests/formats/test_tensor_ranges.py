"""A tensor made of many small ranges (a strided view: one range per row) streams its exact bytes in a few window
reads, not one read per range; a truncated file is still an error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptctl.errors import IntegrityError
from ckptctl.formats.tensor_layout import MERGE_GAP_BYTES, Range, TensorSource
from ckptctl.storage import Location


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    reads: list[tuple[int, int]] = []
    real = Location.read_range

    def read_range(self: Location, rel: str, start: int, end: int) -> bytes:
        reads.append((start, end))
        return real(self, rel, start, end)

    monkeypatch.setattr(Location, "read_range", read_range)
    return reads


def test_a_strided_view_streams_its_rows_in_few_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * 2**20)
    (tmp_path / "w.bin").write_bytes(data)
    rows, width, step = 40_000, 16, 64  # every 4th 16-byte row of a 64-byte-stride storage
    ranges = tuple(Range("w.bin", i * step, i * step + width) for i in range(rows))
    tensor = TensorSource(Location.from_url(str(tmp_path)), "w", "uint8", (rows, width), ranges)
    reads = _counting(monkeypatch)
    assert tensor.read() == b"".join(data[r.start : r.end] for r in ranges)
    assert len(reads) <= 2  # 2.5 MiB of span: one 16 MiB window (was 40,000 reads)


def test_far_apart_ranges_are_not_read_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(4 * MERGE_GAP_BYTES)
    (tmp_path / "w.bin").write_bytes(data)
    far = 2 * MERGE_GAP_BYTES
    ranges = (Range("w.bin", 0, 8), Range("w.bin", far, far + 8))
    tensor = TensorSource(Location.from_url(str(tmp_path)), "w", "uint8", (2, 8), ranges)
    reads = _counting(monkeypatch)
    assert tensor.read() == data[0:8] + data[far : far + 8]
    assert reads == [(0, 8), (far, far + 8)]  # the gap between them is never fetched


def test_a_window_past_the_end_of_the_file_is_truncation(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"x" * 100)
    ranges = tuple(Range("w.bin", i * 40, i * 40 + 16) for i in range(4))  # the last row lies past byte 100
    tensor = TensorSource(Location.from_url(str(tmp_path)), "w", "uint8", (4, 16), ranges)
    with pytest.raises(IntegrityError, match=r"w\.bin is truncated"):
        tensor.read()
