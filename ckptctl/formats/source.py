"""Ranged reads of one file, cached, so each reader asks the store only for bytes it has not seen yet.

Over an object store every read is a GET: readers ask for a speculative head or tail once and find everything
they need in it, and a second read happens only when a header is larger than the guess. ``requests`` and
``bytes_fetched`` make that cost visible (``bench/inspect.py``, tests).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptctl.storage.location import Location

PROBE_BYTES = 64 * 1024
# Ranges closer than this are fetched by one request (prefetch): a GET costs more than this many extra bytes.
MERGE_GAP = 64 * 1024


class FileSource:
    """The bytes of ``rel`` in ``location`` (a file of known ``size``), read by ranges and cached."""

    def __init__(self, location: Location, rel: str, size: int) -> None:
        self.location = location
        self.rel = rel
        self.size = size
        self.requests = 0
        self.bytes_fetched = 0
        self._chunks: list[tuple[int, bytes]] = []

    @property
    def name(self) -> str:
        return self.rel or self.location.url

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) clipped to the file; one ranged request unless already fetched."""
        start, end = max(0, start), min(end, self.size)
        if end <= start:
            return b""
        for offset, data in self._chunks:
            if offset <= start and end <= offset + len(data):
                return data[start - offset : end - offset]
        data = self.location.read_range(self.rel, start, end)
        self.requests += 1
        self.bytes_fetched += len(data)
        self._chunks.append((start, data))
        return data

    def cached(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) if an earlier read fetched them all, else None (never a request)."""
        start, end = max(0, start), min(end, self.size)
        for offset, data in self._chunks:
            if offset <= start and end <= offset + len(data):
                return data[start - offset : end - offset]
        return b"" if end <= start else None

    def prefetch(self, ranges: Iterable[tuple[int, int]], gap: int = MERGE_GAP) -> None:
        """Fetch many small ranges with few requests: those not cached yet are merged when less than ``gap``
        bytes apart, and each merged span is one request; later ``read`` calls of them are served from cache."""
        wanted = sorted(
            (max(0, s), min(e, self.size)) for s, e in ranges if self.cached(s, e) is None and e > s
        )
        spans: list[list[int]] = []
        for start, end in wanted:
            if spans and start - spans[-1][1] <= gap:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        for start, end in spans:
            self.read(start, end)

    def head(self, length: int = PROBE_BYTES) -> bytes:
        return self.read(0, length)

    def tail(self, length: int = PROBE_BYTES) -> tuple[int, bytes]:
        """The last ``length`` bytes and the offset where they start."""
        start = max(0, self.size - length)
        if self.size <= 2 * length:
            # A small file: one request for all of it serves the head and the tail.
            return start, self.read(0, self.size)[start:]
        return start, self.read(start, self.size)
