"""A torch.save file of either serialization (zip archive or legacy), the values of its scalar tensors, and
where every tensor's bytes lie.

Most readers only list tensors; a few need a value: Lightning stores its monitored scores as 0-d tensors
(formats.md §2.2). Those are read with ranged reads of just their bytes, the nearby ones merged into one request
(``FileSource.prefetch``), so a handful of scores costs one request however large the file is.

``consolidate`` streams every tensor (``tensor_sources``). Both serializations store a tensor as a view
(offset, shape, stride) of a storage whose bytes lie whole in the file, so a contiguous tensor is one byte range.
A non-contiguous one (``w.t()`` saved as a view, a slice with a step) is a list of pieces built from its strides
alone: byte ranges in C order when its innermost dimensions are contiguous runs (streamed, no memory), or, when
the contiguous runs of the storage lie across C order (a transpose), ``Chunk`` blocks that ``TensorSource``
assembles in memory (about twice the tensor, one tensor at a time, for tensors up to ``MAX_ASSEMBLED_BYTES``).
Every piece costs one read and 170-350 bytes of plan, so one state dict may hold at most ``MAX_VIEW_PIECES``.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ckptctl.errors import IntegrityError, UsageError
from ckptctl.formats.model import DTYPE_BITS
from ckptctl.formats.restricted_pickle import Foreign, TensorRef
from ckptctl.formats.source import FileSource
from ckptctl.formats.tensor_layout import Chunk, Range, TensorSource, is_contiguous
from ckptctl.formats.torch_legacy import LegacyTorchFile, read_legacy_torch
from ckptctl.formats.torch_zip import (
    LegacyTorchFormat,
    TensorRecord,
    TorchArchive,
    member_span,
    read_torch_archive,
)
from ckptctl.storage.location import Location

TorchFile = TorchArchive | LegacyTorchFile

_STRUCT = {
    "float64": "d",
    "float32": "f",
    "float16": "e",
    "int64": "q",
    "int32": "i",
    "int16": "h",
    "int8": "b",
    "uint8": "B",
    "bool": "?",
}


def read_torch_file(source: FileSource, *, foreign: Foreign = "refuse") -> TorchFile:
    """Either serialization: the zip directory from the tail first (the common case, one read), else the
    legacy pickles from the start."""
    try:
        return read_torch_archive(source, foreign=foreign)
    except LegacyTorchFormat:
        return read_legacy_torch(source, foreign=foreign)


def is_big_endian(file: TorchFile) -> bool:
    """Whether the file's tensors are stored big-endian (torch.save on a big-endian machine): their bytes are
    not what little-endian readers and safetensors expect."""
    if isinstance(file, LegacyTorchFile):
        return not file.little_endian
    member = file.directory.member(f"{file.prefix}/byteorder")
    if member is None or member.method != 0:
        return False
    start = file.source.read(member.header_offset, member.header_offset + 30)
    if len(start) < 30:
        return False
    offset = (
        member.header_offset
        + 30
        + int.from_bytes(start[26:28], "little")
        + int.from_bytes(start[28:30], "little")
    )
    return file.source.read(offset, offset + member.size).strip() == b"big"


def _value_range(file: TorchFile, ref: TensorRef) -> tuple[int, int] | None:
    """Where a one-element tensor's bytes are, or None when they cannot be found without guessing."""
    itemsize = DTYPE_BITS.get(ref.dtype, 0) // 8
    if ref.dtype not in _STRUCT and ref.dtype != "bfloat16":
        return None
    if isinstance(file, LegacyTorchFile):
        storage = file.storage(ref.storage.key)
        if storage is None or file.unknown is not None:
            return None
        start = storage.data_offset + ref.storage_offset * itemsize
        return (start, start + itemsize) if start + itemsize <= storage.end else None
    member = file.storage_member(ref.storage.key)
    if member is None or member.method != 0 or (ref.storage_offset + 1) * itemsize > member.size:
        return None
    data_offset = file.storage_data_offset(ref.storage.key)
    start = data_offset + ref.storage_offset * itemsize
    return start, start + itemsize


def read_scalars(file: TorchFile, refs: Sequence[TensorRef]) -> list[float | int | bool | None]:
    """The value of each one-element tensor in ``refs`` (None for others or unreadable ones).

    Cost: the needed storages (and, in a zip, their local headers and the ``byteorder`` member) are fetched
    together; ranges closer than ``MERGE_GAP`` share a request, so a few scores are usually one request.
    """
    wanted = [r for r in refs if len([d for d in r.shape if d != 1]) == 0]
    if isinstance(file, TorchArchive):
        spans = []
        for ref in wanted:
            member = file.storage_member(ref.storage.key)
            if member is not None:
                spans.append(member_span(member))
        byteorder = file.directory.member(f"{file.prefix}/byteorder")
        if byteorder is not None:
            spans.append(member_span(byteorder))
        file.source.prefetch(spans)
    else:
        ranges = [_value_range(file, r) for r in wanted]
        file.source.prefetch(r for r in ranges if r is not None)
    order = ">" if is_big_endian(file) else "<"
    values: dict[int, float | int | bool | None] = {}
    for ref in wanted:
        span = _value_range(file, ref)
        raw = file.source.read(*span) if span is not None else b""
        if span is None or len(raw) != span[1] - span[0]:
            values[id(ref)] = None
        elif ref.dtype == "bfloat16":
            bits = raw if order == ">" else raw[::-1]
            values[id(ref)] = struct.unpack(">f", bits + b"\0\0")[0]
        else:
            values[id(ref)] = struct.unpack(order + _STRUCT[ref.dtype], raw)[0]
    return [values.get(id(r)) for r in refs]


# A non-contiguous tensor's pieces (ranges or chunks) are planned before any byte is read, for every tensor of a
# state dict at once, and each is one read when streamed: a million pieces are at most ~0.35 GB of plan and
# about 75 s of reads on a local disk (72 us each, measured), far longer on an object store.
MAX_VIEW_PIECES = 1_000_000
# Tensors whose pieces are chunks (a transpose) are assembled in memory, taking about twice their size.
MAX_ASSEMBLED_BYTES = 2**30
_NOT_STREAMABLE_HINT = (
    "re-save the state dict with contiguous tensors: {k: v.contiguous() for k, v in sd.items()}"
)


@dataclass
class PieceBudget:
    """The pieces non-contiguous tensors may still take in one state dict (all its shards): the plan of every
    tensor is held at once, so the bound is on their sum, not per tensor."""

    remaining: int = MAX_VIEW_PIECES


def tensor_sources(file: TorchFile, budget: PieceBudget | None = None) -> dict[str, TensorSource]:
    """Every tensor of a listed torch file as a ``TensorSource`` of byte ranges (or chunks) of that file.

    The file's structural checks must have passed first (``check_members`` / ``LegacyTorchFile.check``: every
    view inside its storage, every storage inside the file). UsageError for what cannot be streamed as stored (a
    big-endian file, more pieces than ``budget``); IntegrityError when the storages cannot be located."""
    source = file.source
    if isinstance(file, LegacyTorchFile) and file.unknown is not None:
        raise IntegrityError(
            f"{source.name}: {file.unknown}, so its tensors cannot be located",
            url=source.location.url_of(source.rel),
        )
    if is_big_endian(file):
        raise UsageError(
            f"{source.name}: tensors stored big-endian (saved on a big-endian machine) are not converted",
            url=source.location.url_of(source.rel),
        )
    budget = budget if budget is not None else PieceBudget()
    return {
        record.name: _view_source(
            source.location, source.rel, record, file.storage_data_offset(record.storage_key), budget
        )
        for record in file.tensors
    }


def _view_source(
    location: Location, rel: str, record: TensorRecord, storage_start: int, budget: PieceBudget
) -> TensorSource:
    """One tensor's bytes in C order: one range when contiguous, else the fewer of its C-order runs (streamed)
    and its storage-contiguous blocks (assembled; only when small enough)."""
    first = storage_start + record.storage_offset * record.itemsize
    if is_contiguous(record.shape, record.stride):
        return TensorSource(
            location,
            record.name,
            record.dtype,
            record.shape,
            (Range(rel, first, first + record.numel * record.itemsize),),
        )
    url = location.url_of(rel)
    if any(s < 0 for s in record.stride):
        raise IntegrityError(f"{url}: tensor {record.name} has a negative stride (corrupt)", url=url)
    if DTYPE_BITS[record.dtype] % 8:
        raise UsageError(
            f"{url}: tensor {record.name}: a non-contiguous {record.dtype} view is not converted", url=url
        )
    run, outer = c_order_runs(record.shape, record.stride)
    block, block_dims = storage_block(record.shape, record.stride)
    n_runs, n_blocks = record.numel // run, record.numel // block
    chunked = n_blocks < n_runs and record.numel * record.itemsize <= MAX_ASSEMBLED_BYTES
    pieces = n_blocks if chunked else n_runs
    if pieces > budget.remaining:
        raise UsageError(
            f"{url}: tensor {record.name} {list(record.shape)} with strides {list(record.stride)} is {pieces:,} "
            f"separate pieces, over the {budget.remaining:,} left of the {MAX_VIEW_PIECES:,} the non-contiguous "
            "tensors of a state dict may take",
            url=url,
            hint=_NOT_STREAMABLE_HINT,
        )
    budget.remaining -= pieces
    if chunked:
        chunks = tuple(_block_chunks(rel, record, first, block_dims))
        return TensorSource(location, record.name, record.dtype, record.shape, chunks=chunks)
    item = record.itemsize
    ranges = tuple(
        Range(rel, first + start * item, first + end * item) for start, end in _merged_runs(run, outer)
    )
    return TensorSource(location, record.name, record.dtype, record.shape, ranges)


def c_order_runs(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, list[tuple[int, int]]]:
    """The longest run of elements contiguous in both C order and the storage (the innermost dimensions whose
    strides are the contiguous ones), and the (size, stride) of the dimensions outside it, outermost first.
    Size-1 dimensions never matter."""
    dims = [(n, s) for n, s in zip(shape, stride, strict=True) if n != 1]
    run = 1
    while dims and dims[-1][1] == run:
        run *= dims.pop()[0]
    return run, dims


def storage_block(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """The largest block of elements contiguous in the storage that is also a C-order block of the tensor (its
    dimensions, kept in tensor order, have the contiguous strides of their sizes: a column of ``w.t()``), and
    those dimensions. (1, ()) when no element has a stride-1 neighbour."""
    chosen: list[int] = []
    block = 1
    while True:
        limit = min(chosen, default=len(shape))
        candidates = [i for i in range(limit) if shape[i] != 1 and stride[i] == block]
        if not candidates:
            return block, tuple(sorted(chosen))
        chosen.append(candidates[-1])
        block *= shape[candidates[-1]]


def _merged_runs(run: int, outer: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The element spans [start, end) of every run in C order, relative to the tensor's first element, adjacent
    ones merged. The offsets are expanded one dimension at a time (a list comprehension, not a product of
    index tuples: a million runs take a fraction of a second)."""
    offsets = [0]
    for size, step in outer:
        offsets = [base + i * step for base in offsets for i in range(size)]
    start = end = offsets[0]
    for offset in offsets:
        if offset != end:
            yield start, end
            start = end = offset
        end += run
    yield start, end


def _block_chunks(rel: str, record: TensorRecord, first: int, block_dims: tuple[int, ...]) -> Iterator[Chunk]:
    """The tensor as blocks over ``block_dims`` (whole in those dimensions, 1 wide in the others), each one
    range of the storage; together they tile the tensor."""
    shape, stride, item = record.shape, record.stride, record.itemsize
    sizes = tuple(n if i in block_dims else 1 for i, n in enumerate(shape))
    nbytes = math.prod(sizes) * item
    for index in itertools.product(*(range(1) if i in block_dims else range(n) for i, n in enumerate(shape))):
        start = first + sum(i * s for i, s in zip(index, stride, strict=True)) * item
        yield Chunk(index, sizes, Range(rel, start, start + nbytes))
