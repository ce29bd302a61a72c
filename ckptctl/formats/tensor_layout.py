"""The tensor-source model every format module hands to ``convert/``: where each tensor's bytes lie (ranges of
files, or chunks of a global tensor), how to stream them, and the plan of a whole checkpoint. ``convert/`` only
selects, casts and writes; it never knows which format the bytes came from.

Building a plan reads headers and (restricted) pickles only; a tensor's bytes are read when streamed, in bounded
pieces, so picking 2 MB of LoRA tensors out of a 14 GB checkpoint reads 2 MB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptctl.errors import IntegrityError, UsageError
from ckptctl.formats.model import DTYPE_BITS, NUMPY_CODE, nbytes_of
from ckptctl.storage.location import Location

if TYPE_CHECKING:  # numpy is imported when bytes are assembled or cast, not to list or plan
    import numpy as np

READ_CHUNK_BYTES = 64 * 2**20


MERGE_GAP_BYTES = 64 * 2**10
"""Bytes between two ranges of one file that a window read may fetch and throw away rather than start a new read."""
MERGE_WINDOW_BYTES = 16 * 2**20
"""The most one window read of several ranges spans (it is held with the pieces cut from it: twice this)."""


def _windows(ranges: tuple[Range, ...]) -> Iterator[tuple[str, int, int, list[Range]]]:
    """``ranges`` grouped, in order, into windows of one file: each next range starts at or after the window's
    end, at most ``MERGE_GAP_BYTES`` later, and the window stays within ``MERGE_WINDOW_BYTES``. A range bigger
    than that is a window of its own. Yields (file, start, end, the ranges)."""
    current: list[Range] = []
    for item in ranges:
        if current:
            first, last = current[0], current[-1]
            if (
                item.rel == last.rel
                and last.end <= item.start <= last.end + MERGE_GAP_BYTES
                and item.end - first.start <= MERGE_WINDOW_BYTES
            ):
                current.append(item)
                continue
            yield first.rel, first.start, last.end, current
        current = [item]
    if current:
        yield current[0].rel, current[0].start, current[-1].end, current


def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """C order, as torch's ``is_contiguous``: the strides of size-1 dimensions, and of empty tensors, do not
    matter. Only such tensors can be streamed as one byte range."""
    if len(shape) != len(stride):
        return False
    if math.prod(shape) <= 1:
        return True
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride), strict=True):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


@dataclass(frozen=True)
class Range:
    """Bytes [start, end) of one file, relative to the tensor's location."""

    rel: str
    start: int
    end: int


@dataclass(frozen=True)
class Chunk:
    """A block of a tensor stored on its own (a DCP chunk, a DTensor shard): where it lies in the global tensor
    (``offsets``, ``sizes``, C order) and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    range: Range


@dataclass(frozen=True)
class TensorSource:
    """One tensor of a checkpoint: its dtype and shape, and where its bytes are under ``location`` — either
    ``ranges`` (concatenated, then cut to the tensor's size: ZeRO-3 partitions are padded) or ``chunks`` that
    tile the global tensor (checked by the format module that made them)."""

    location: Location
    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[Range, ...] = ()
    chunks: tuple[Chunk, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    def stream(self) -> Iterator[bytes]:
        """The tensor's bytes in C order, in pieces of at most 64 MiB; a short read is an IntegrityError
        (truncated file). Chunks that are slabs of the first dimension stream straight from the files; any other
        tiling (``Shard(1)``) is assembled in memory, about twice the tensor's size (one tensor at a time)."""
        if not self.chunks:
            yield from self._ranges(self.ranges)
            return
        ranges = slab_ranges(self.shape, self.chunks)
        if ranges is not None:
            yield from self._ranges(ranges)
            return
        yield self._assembled()

    def read(self) -> bytes:
        return b"".join(self.stream())

    def array(self) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 widened exactly to float32)."""
        return to_numpy(self.read(), self.dtype, self.name).reshape(self.shape)

    def _ranges(self, ranges: tuple[Range, ...]) -> Iterator[bytes]:
        """Each range's bytes in order, capped at ``nbytes``. Runs of small ranges close together in one file (a
        strided view: one range per row) are read as one window of at most 16 MiB and cut apart, so a view of a
        million rows costs a few dozen reads, not a million; a big range is read in 64 MiB pieces."""
        remaining = self.nbytes
        for rel, window_start, window_end, members in _windows(ranges):
            if remaining <= 0:
                break
            if len(members) == 1:
                start = window_start
                while start < window_end and remaining > 0:
                    end = min(window_end, start + READ_CHUNK_BYTES, start + remaining)
                    data = self._read(rel, start, end)
                    remaining -= len(data)
                    start = end
                    yield data
                continue
            window = memoryview(self._read(rel, window_start, window_end))
            pieces = []
            for item in members:
                piece = window[item.start - window_start : item.end - window_start][: max(0, remaining)]
                remaining -= len(piece)
                pieces.append(piece)
            yield b"".join(pieces)
        if remaining > 0:
            rel = ranges[0].rel if ranges else self.name
            raise IntegrityError(f"{self.location.url_of(rel)} is truncated (tensor {self.name})")

    def _read(self, rel: str, start: int, end: int) -> bytes:
        data = self.location.read_range(rel, start, end)
        if len(data) != end - start:
            raise IntegrityError(
                f"{self.location.url_of(rel)} is truncated (tensor {self.name})",
                url=self.location.url_of(rel),
            )
        return data

    def _assembled(self) -> bytes:
        import numpy as np

        bits = DTYPE_BITS[self.dtype]
        if bits % 8:
            raise UsageError(
                f"tensor {self.name}: {self.dtype} chunks split across dimensions cannot be assembled"
            )
        item = bits // 8
        shape = self.shape
        # Every byte is overwritten: the chunks tile the tensor.
        out = np.empty((*shape[:-1], shape[-1] * item), dtype=np.uint8)
        for chunk in self.chunks:
            data = TensorSource(self.location, self.name, self.dtype, chunk.sizes, (chunk.range,)).read()
            block = np.frombuffer(data, dtype=np.uint8).reshape(*chunk.sizes[:-1], chunk.sizes[-1] * item)
            index = tuple(slice(o, o + n) for o, n in zip(chunk.offsets[:-1], chunk.sizes[:-1], strict=True))
            last = slice(chunk.offsets[-1] * item, (chunk.offsets[-1] + chunk.sizes[-1]) * item)
            where = (*index, last)
            out[where] = block
        return out.tobytes()


def slab_ranges(shape: tuple[int, ...], chunks: tuple[Chunk, ...]) -> tuple[Range, ...] | None:
    """The chunks as one concatenation in C order when each is whole in every dimension but the first (FSDP's
    ``Shard(0)``, 1-d and 0-d tensors, a single chunk), sorted by offset; None for other layouts (``Shard(1)``).
    The chunks must already be known to tile the tensor."""
    if any(c.offsets[1:] != (0,) * (len(shape) - 1) or c.sizes[1:] != shape[1:] for c in chunks):
        return None
    return tuple(c.range for c in sorted(chunks, key=lambda c: c.offsets[:1]))


def to_numpy(data: bytes, dtype: str, name: str = "") -> np.ndarray:
    """Raw little-endian bytes as a flat numpy array; bfloat16 is widened exactly to float32."""
    import numpy as np

    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype not in NUMPY_CODE:
        raise UsageError(f"tensor {name or '?'}: dtype {dtype} is not supported here")
    return np.frombuffer(data, dtype=NUMPY_CODE[dtype])


@dataclass
class TensorPlan:
    """A checkpoint's model weights as the format module found them, before any byte is read: what ``convert/``
    selects from, casts and writes."""

    tag: str
    """What was opened (a ZeRO tag, a DCP folder, a file name), for the report."""
    format: str
    tensors: list[TensorSource]
    aliases: dict[str, str] = field(default_factory=dict)
    """Tied weights: alias -> the tensor whose bytes it shares (written once)."""
    stage: int | None = None
    """ZeRO only."""
    world_size: int | None = None
    warnings: list[str] = field(default_factory=list)
    dropped: int = 0
    """Tensors of the checkpoint that are not model weights (optimizer state, train state), left out."""
    non_tensors: list[str] = field(default_factory=list)
    """Non-tensor items of the model sub-tree (DCP bytes items), listed and left out, never unpickled."""
    default_dtype: str | None = None
    """The dtype floats are written in when no ``--dtype`` is given (ZeRO: float32, as ``zero_to_fp32``);
    None keeps each tensor's stored dtype."""
