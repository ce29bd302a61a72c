"""Write-behind: files written through it hold exactly the bytes written, and asking for write-out never fails
a write (pipes, files systems that refuse it, other platforms)."""

from __future__ import annotations

import os
from pathlib import Path

from ckptctl.storage.writeback import start_writeback, write_at, write_behind_file


def test_buffered_writes_of_every_size_land_exactly(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    pieces = [os.urandom(n) for n in (0, 1, 7, 2**20 - 1, 2**20, 3 * 2**20 + 5, 13)]
    with write_behind_file(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)) as handle:
        for piece in pieces:
            handle.write(piece)
        handle.seek(3)  # a writer that goes back to patch a header
        handle.write(b"HDR")
    expected = bytearray(b"".join(pieces))
    expected[3:6] = b"HDR"
    assert path.read_bytes() == bytes(expected)


def test_write_at_fills_ranges_out_of_order(tmp_path: Path) -> None:
    path = tmp_path / "ranges.bin"
    blocks = [os.urandom(2**20 + 3) for _ in range(4)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for index in (2, 0, 3, 1):  # ranged GETs finish in any order
            write_at(fd, memoryview(blocks[index]), index * len(blocks[0]))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(blocks)


def test_asking_for_write_out_where_it_cannot_happen_is_harmless(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        start_writeback(write_end, 0, 10)  # a pipe: the kernel refuses (ESPIPE), the caller never sees it
        os.write(write_end, b"still fine")
        assert os.read(read_end, 10) == b"still fine"
    finally:
        os.close(read_end)
        os.close(write_end)
    start_writeback(12345, 0, 10)  # a closed descriptor (EBADF): ignored as well
