"""A torch.save file of either serialization (zip archive or legacy), and the values of its scalar tensors.

Most readers only list tensors; a few need a value: Lightning stores its monitored scores as 0-d tensors
(formats.md §2.2). Those are read with ranged reads of just their bytes, the nearby ones merged into one request
(``FileSource.prefetch``), so a handful of scores costs one request however large the file is.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ckptctl.formats.model import DTYPE_BITS
from ckptctl.formats.restricted_pickle import Foreign, TensorRef
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_legacy import LegacyTorchFile, read_legacy_torch
from ckptctl.formats.torch_zip import LegacyTorchFormat, TorchArchive, member_span, read_torch_archive

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


def _big_endian(file: TorchFile) -> bool:
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
    order = ">" if _big_endian(file) else "<"
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
