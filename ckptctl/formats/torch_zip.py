"""torch.save zip archives (``.pt``, ``.bin``, ``.pth``, ``.ckpt``, DeepSpeed ``*_states.pt``), read torch-free.

The layout (shared/notes/formats.md §2): ``<stem>/data.pkl`` first, one STORED ``<stem>/data/<key>`` member per
storage (64-byte aligned), the central directory last. So two ranged reads list a file of any size: the tail
(end-of-central-directory record + central directory) and then ``data.pkl``, which the restricted unpickler turns
into ``TensorRef`` records without running anything. The archive also tells where each storage's bytes start,
for readers that stream tensor data later (``consolidate``).

Everything in the directory is checked before it is used (issue 15): the end record must account for the
directory exactly, every entry must lie inside it, zip64 fields must be there when the 32-bit ones say so, and a
member is inflated only up to a size plausible for its compressed size and a pickle. A file that breaks any of
these is an IntegrityError (exit 8), never a ``struct.error``, ``zlib.error`` or ``MemoryError``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptctl.errors import IntegrityError, TruncatedError, UsageError
from ckptctl.formats.model import DTYPE_BITS, MAX_DIMENSION, Defect, checked_shape, numel_of
from ckptctl.formats.restricted_pickle import (
    MAX_PICKLE_BYTES,
    Foreign,
    PickledObject,
    TensorRef,
    restricted_loads,
)
from ckptctl.formats.source import PROBE_BYTES, FileSource

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_LOCAL_HEADER = 30
_CENTRAL_HEADER = 46
ZIP_MAGIC = _LOCAL
# Extra bytes read after a local header's name: torch pads with an extra field of up to 64 + 4 bytes.
_LOCAL_EXTRA_GUESS = 128
# Read past data.pkl too: torch writes the tiny .format_version, .storage_alignment and byteorder members next,
# and a reader of tensor values wants the byte order without another request.
_FOLLOWING_MEMBERS_GUESS = 1024
# The first read of a zip's tail: the central directory of a checkpoint with ~200 storages fits, so a file is
# listed with two ranged GETs (tail, data.pkl); a larger directory costs one more GET for exactly the rest.
# A bigger guess would save that GET but fetch bytes that are mostly tensor data.
TAIL_PROBE_BYTES = 16 * 1024


@dataclass(frozen=True)
class ZipMember:
    name: str
    method: int
    compressed_size: int
    size: int
    header_offset: int


@dataclass(frozen=True)
class ZipDirectory:
    members: tuple[ZipMember, ...]
    cd_offset: int
    cd_size: int
    eocd_offset: int

    def member(self, name: str) -> ZipMember | None:
        return next((m for m in self.members if m.name == name), None)


def _bad(source: FileSource, message: str) -> IntegrityError:
    return IntegrityError(f"{source.name}: {message}", url=source.location.url_of(source.rel))


def _truncated(source: FileSource, message: str) -> TruncatedError:
    return TruncatedError(f"{source.name}: {message}", url=source.location.url_of(source.rel))


def read_zip_directory(source: FileSource) -> ZipDirectory:
    """The central directory, from the file's tail (one ranged read, two when the directory is larger).

    TruncatedError when the end record is missing (torch writes it last: a cut file has none); IntegrityError
    for a directory that does not add up (its size, its entries, zip64 fields, members past the end of the
    file), as ``zipfile`` and torch's own reader refuse those too.
    """
    if source.size < 22:
        raise _truncated(source, f"{source.size} bytes: too short for a zip archive (empty or truncated)")
    tail_start, tail = source.tail(TAIL_PROBE_BYTES)
    pos = tail.rfind(_EOCD)
    while pos >= 0 and len(tail) - pos < 22:
        pos = tail.rfind(_EOCD, 0, pos)
    if pos < 0:
        raise _truncated(source, "no zip end-of-central-directory record (truncated, or not a zip archive)")
    eocd_offset = tail_start + pos
    entries, cd_size, cd_offset = struct.unpack("<10xHII", tail[pos : pos + 20])
    directory_end = eocd_offset
    # torch's writer always adds the zip64 end record and its locator before the end record, even for small
    # files: the directory then ends where that record starts.
    has_zip64 = pos >= 20 and tail[pos - 20 : pos - 16] == _EOCD64_LOCATOR
    if has_zip64 or 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        entries64, size64, offset64, directory_end = _zip64_end(source, tail, tail_start, pos)
        for narrow, wide, saturated in (
            (entries, entries64, 0xFFFF),
            (cd_size, size64, 0xFFFFFFFF),
            (cd_offset, offset64, 0xFFFFFFFF),
        ):
            if narrow not in (saturated, wide):
                raise _bad(source, "the zip end record and the zip64 end record disagree (corrupt)")
        entries, cd_size, cd_offset = entries64, size64, offset64
    if cd_offset + cd_size > directory_end:
        raise _bad(
            source, f"zip central directory ({cd_offset}+{cd_size}) runs past its end record (corrupt)"
        )
    if cd_offset + cd_size != directory_end:
        raise _bad(
            source,
            f"zip end record says the central directory is {cd_size} bytes at {cd_offset}, but it ends at "
            f"{directory_end} (corrupt)",
        )
    if entries * _CENTRAL_HEADER > cd_size:
        raise _bad(source, f"zip end record counts {entries} entries in a {cd_size}-byte directory (corrupt)")
    cd_end = cd_offset + cd_size
    if cd_offset >= tail_start:
        directory = tail[cd_offset - tail_start : cd_end - tail_start]
    else:  # only the part of the directory the tail did not hold
        directory = source.read(cd_offset, tail_start) + tail[: cd_end - tail_start]
    members = _parse_central(source, directory, entries)
    return ZipDirectory(tuple(members), cd_offset, cd_size, eocd_offset)


def _zip64_end(source: FileSource, tail: bytes, tail_start: int, pos: int) -> tuple[int, int, int, int]:
    """Entries, directory size and offset from the zip64 end record, and where that record starts (the
    directory must end there)."""
    loc = pos - 20
    if loc < 0 or tail[loc : loc + 4] != _EOCD64_LOCATOR:
        raise _bad(source, "zip64 end record locator missing (corrupt)")
    (eocd64_offset,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
    if eocd64_offset + 56 > tail_start + loc:
        raise _bad(source, f"zip64 end record offset {eocd64_offset} is past its locator (corrupt)")
    if tail_start <= eocd64_offset:
        record = tail[eocd64_offset - tail_start : eocd64_offset - tail_start + 56]
    else:
        record = source.read(eocd64_offset, eocd64_offset + 56)
    if len(record) != 56 or record[:4] != _EOCD64:
        raise _bad(source, "zip64 end-of-central-directory record missing (corrupt)")
    entries, cd_size, cd_offset = struct.unpack("<8xQQQ", record[24:56])
    return entries, cd_size, cd_offset, eocd64_offset


def _parse_central(source: FileSource, data: bytes, entries: int) -> list[ZipMember]:
    """Every entry of the directory, each wholly inside it, and nothing left over."""
    members = []
    pos = 0
    for _ in range(entries):
        if data[pos : pos + 4] != _CENTRAL or pos + _CENTRAL_HEADER > len(data):
            raise _bad(source, f"zip central directory entry at +{pos} is corrupt")
        (method, csize, usize, nlen, elen, clen, offset) = struct.unpack(
            "<10xH8xIIHHH8xI", data[pos : pos + _CENTRAL_HEADER]
        )
        end = pos + _CENTRAL_HEADER + nlen + elen + clen
        if end > len(data):
            raise _bad(source, f"zip central directory entry at +{pos} runs past the directory (corrupt)")
        name = data[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        extra = data[pos + 46 + nlen : pos + 46 + nlen + elen]
        if 0xFFFFFFFF in (csize, usize, offset):
            usize, csize, offset = _zip64_sizes(source, name, extra, usize, csize, offset)
        if offset + _LOCAL_HEADER + csize > source.size:
            raise _bad(
                source, f"member {name}: {csize} bytes at {offset} lie past the end of the file (corrupt)"
            )
        members.append(ZipMember(name, method, csize, usize, offset))
        pos = end
    if pos != len(data):
        raise _bad(
            source, f"zip central directory holds {len(data) - pos} bytes after its last entry (corrupt)"
        )
    return members


def _zip64_sizes(
    source: FileSource, name: str, extra: bytes, usize: int, csize: int, offset: int
) -> tuple[int, int, int]:
    """The zip64 extra field holds, in this order, each of the three values whose 32-bit field is 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[pos : pos + 4])
        if tag == 1:
            body = extra[pos + 4 : pos + 4 + length]
            needed = [usize, csize, offset].count(0xFFFFFFFF)
            if len(body) < 8 * needed:
                raise _bad(source, f"member {name}: zip64 extra field is short ({len(body)} bytes) (corrupt)")
            values = list(struct.unpack(f"<{needed}Q", body[: 8 * needed]))
            usize = values.pop(0) if usize == 0xFFFFFFFF else usize
            csize = values.pop(0) if csize == 0xFFFFFFFF else csize
            offset = values.pop(0) if offset == 0xFFFFFFFF else offset
            return usize, csize, offset
        pos += 4 + length
    raise _bad(source, f"member {name}: sizes need a zip64 extra field, which is missing (corrupt)")


def member_data_offset(source: FileSource, member: ZipMember) -> int:
    """Where a member's bytes start: after its local header, whose extra field (torch's alignment padding)
    differs from the central directory's, so the local header is read (from cache when already fetched)."""
    start = member.header_offset
    header = source.read(start, start + _LOCAL_HEADER)
    if header[:4] != _LOCAL or len(header) < _LOCAL_HEADER:
        raise _bad(source, f"member {member.name}: no local header at {start} (corrupt)")
    nlen, elen = struct.unpack("<HH", header[26:30])
    return start + _LOCAL_HEADER + nlen + elen


def member_span(member: ZipMember) -> tuple[int, int]:
    """A range that holds a member's local header and data when its extra field is torch's usual padding:
    reading it first makes ``member_data_offset`` and the data read one request."""
    start = member.header_offset
    return start, start + _LOCAL_HEADER + len(
        member.name.encode()
    ) + _LOCAL_EXTRA_GUESS + member.compressed_size


# Deflate cannot expand data more than ~1032:1; a member claiming more (or more than a pickle may be) is refused
# before anything is inflated.
_MAX_DEFLATE_RATIO = 1032


def read_member(source: FileSource, member: ZipMember, *, limit: int = MAX_PICKLE_BYTES) -> bytes:
    """A member's bytes: one ranged read covering its local header and data (a second if the guess missed).

    A member is read whole only up to ``limit`` bytes, and a deflated one is inflated only up to its declared
    size, which must be plausible for its compressed size: a zip bomb is an IntegrityError, not a MemoryError.
    """
    if member.size > limit or member.compressed_size > limit:
        raise _bad(source, f"member {member.name} is {member.size} bytes, over the {limit}-byte limit for it")
    start, end = member_span(member)
    source.read(start, end + _FOLLOWING_MEMBERS_GUESS)
    begin = member_data_offset(source, member)
    data = source.read(begin, begin + member.compressed_size)
    if len(data) != member.compressed_size:
        raise _truncated(source, f"member {member.name} runs past the end of the file (truncated)")
    if member.method == 0:
        if member.size != member.compressed_size:
            raise _bad(source, f"member {member.name}: stored, but its sizes differ (corrupt)")
        return data
    if member.method != 8:
        raise _bad(source, f"member {member.name}: unsupported zip compression method {member.method}")
    if member.size > max(1024, member.compressed_size * _MAX_DEFLATE_RATIO):
        raise _bad(
            source,
            f"member {member.name}: {member.compressed_size} deflated bytes cannot inflate to the {member.size} "
            "declared (corrupt)",
        )
    inflater = zlib.decompressobj(-15)
    try:
        inflated = inflater.decompress(data, member.size + 1)
    except zlib.error as exc:
        raise _bad(source, f"member {member.name}: not valid deflate data ({exc})") from None
    if len(inflated) != member.size or not inflater.eof:
        raise _bad(
            source,
            f"member {member.name}: inflates to {len(inflated)}{'+' if not inflater.eof else ''} bytes, "
            f"the directory says {member.size} (corrupt)",
        )
    return inflated


# -- torch archives ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRecord:
    """A tensor of a torch archive, with what a streaming reader needs to find its bytes."""

    path: tuple[Any, ...]
    """Keys from the top of the pickled object to the tensor."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_key: str
    storage_offset: int
    """In elements of ``dtype``."""
    storage_numel: int
    storage_dtype: str | None
    requires_grad: bool

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_BITS[self.dtype] // 8


@dataclass(frozen=True)
class TorchArchive:
    """A listed torch archive: its zip directory, the unpickled object (inert records) and its tensors."""

    source: FileSource
    directory: ZipDirectory
    prefix: str
    obj: Any
    tensors: tuple[TensorRecord, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    """Tensor name -> the earlier name viewing the same bytes (tied weights)."""

    def storage_member(self, key: str) -> ZipMember | None:
        return self.directory.member(f"{self.prefix}/data/{key}")

    def storage_data_offset(self, key: str) -> int:
        """Absolute offset in the file where storage ``key`` starts (may read its local header)."""
        member = self.storage_member(key)
        if member is None:
            raise _bad(self.source, f"storage data/{key} is missing from the archive")
        return member_data_offset(self.source, member)

    def tensor_byte_offset(self, record: TensorRecord) -> int:
        """Absolute offset of a tensor's first element (for streaming its bytes without torch)."""
        return self.storage_data_offset(record.storage_key) + record.storage_offset * record.itemsize

    def check_members(self) -> list[Defect]:
        """Every member's declared size within the file, every storage present and large enough for its
        tensors: the structural checks of ``inspect --verify``, from the central directory alone."""
        file = self.source.rel or self.source.location.url
        defects: list[Defect] = []
        ordered = sorted(self.directory.members, key=lambda m: m.header_offset)
        limits = [m.header_offset for m in ordered[1:]] + [self.directory.cd_offset]
        for member, limit in zip(ordered, limits, strict=True):
            end = member.header_offset + _LOCAL_HEADER + len(member.name.encode()) + member.compressed_size
            if end > limit:
                defects.append(
                    Defect(file, f"member {member.name} ({member.compressed_size} bytes) overruns {limit}")
                )
        sizes = {m.name: m.size for m in self.directory.members}
        defects += view_defects(self.tensors, lambda key: sizes.get(f"{self.prefix}/data/{key}"), file)
        return defects


def view_defects(
    records: tuple[TensorRecord, ...], storage_bytes: Callable[[str], int | None], file: str
) -> list[Defect]:
    """Every tensor's storage present (``storage_bytes`` is None when not) and large enough for its view."""
    defects: list[Defect] = []
    for record in records:
        size = storage_bytes(record.storage_key)
        if size is None:
            defects.append(Defect(file, f"tensor {record.name}: storage data/{record.storage_key} missing"))
            continue
        if record.numel == 0:
            continue
        last = record.storage_offset + sum(
            (d - 1) * s for d, s in zip(record.shape, record.stride, strict=False)
        )
        needed = (last + 1) * record.itemsize
        if needed > size:
            defects.append(
                Defect(
                    file,
                    f"tensor {record.name}: needs {needed} bytes of storage {record.storage_key}, it has {size}",
                )
            )
    return defects


def _find_prefix(source: FileSource, directory: ZipDirectory) -> tuple[str, ZipMember]:
    pickles = [m for m in directory.members if m.name.endswith("/data.pkl") and m.name.count("/") == 1]
    if len(pickles) != 1:
        raise _bad(source, "a zip archive, but not a torch checkpoint (no single <name>/data.pkl)")
    return pickles[0].name[: -len("/data.pkl")], pickles[0]


class LegacyTorchFormat(UsageError):
    """A torch file in the pre-1.6 non-zip format, given to a reader of zip archives only (``inspect`` and the
    catalog read both: formats/torch_legacy.py)."""

    code = "legacy_torch_format"


def is_legacy_torch(source: FileSource) -> bool:
    from ckptctl.formats.torch_legacy import is_legacy_head

    return is_legacy_head(source.head(PROBE_BYTES))


def tensor_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


MAX_DEPTH = 64


def iter_tensors(
    obj: Any, path: tuple[Any, ...] = (), _active: set[int] | None = None, _budget: list[int] | None = None
) -> Iterator[tuple[tuple[Any, ...], TensorRef]]:
    """Every tensor in an unpickled object tree, depth first, with its path of keys.

    A pickle can build cycles, arbitrarily deep nesting and containers shared so often that the paths through
    them multiply (a few hundred bytes can describe 2**64 of them): all are refused rather than followed, the
    last by a budget of visits proportional to the number of objects a pickle of ``MAX_PICKLE_BYTES`` holds.
    """
    if isinstance(obj, TensorRef):
        yield path, obj
        return
    if isinstance(obj, dict):
        items: Iterator[tuple[Any, Any]] = iter(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif isinstance(obj, PickledObject):
        items = iter(obj.fields().items())
    else:
        return
    active = set() if _active is None else _active
    budget = [_VISIT_BUDGET] if _budget is None else _budget
    budget[0] -= 1
    if id(obj) in active or len(path) > MAX_DEPTH:
        raise IntegrityError(f"object nested too deeply or in a cycle at {tensor_name(path)[:200]!r}")
    if budget[0] < 0:
        raise IntegrityError("object tree with too many shared containers (its paths multiply)")
    active.add(id(obj))
    for key, value in items:
        yield from iter_tensors(value, (*path, key), active, budget)
    active.discard(id(obj))


_VISIT_BUDGET = 2_000_000


def tensor_records(obj: Any) -> tuple[tuple[TensorRecord, ...], dict[str, str]]:
    """Every tensor of an unpickled torch object as a checked record, and the aliases among them (names that
    view the same bytes as an earlier one). IntegrityError for a shape, stride, offset or dtype that no real
    tensor has."""
    records: list[TensorRecord] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for path, ref in iter_tensors(obj):
        name = tensor_name(path)
        shape = checked_shape(ref.shape, f"tensor {name[:200]!r}")
        if (
            not (type(ref.storage_offset) is int and 0 <= ref.storage_offset < MAX_DIMENSION)
            or len(ref.stride) != len(shape)
            or not all(type(d) is int and abs(d) < MAX_DIMENSION for d in ref.stride)
        ):
            raise IntegrityError(f"tensor {name[:200]!r} has an invalid shape, stride or offset")
        if ref.dtype not in DTYPE_BITS:
            raise IntegrityError(f"tensor {name[:200]!r} has an unknown dtype {ref.dtype[:40]!r}")
        record = TensorRecord(
            path,
            name,
            ref.dtype,
            shape,
            tuple(ref.stride),
            ref.storage.key,
            ref.storage_offset,
            ref.storage.numel,
            ref.storage.dtype,
            ref.requires_grad,
        )
        view = (ref.storage.key, ref.storage_offset, shape, record.stride, ref.dtype)
        if view in seen and record.numel > 0:
            aliases[name] = seen[view]
        else:
            seen.setdefault(view, name)
        records.append(record)
    return tuple(records), aliases


def read_torch_archive(source: FileSource, *, foreign: Foreign = "refuse") -> TorchArchive:
    """List a torch archive: zip directory from the tail, ``data.pkl`` through the restricted unpickler
    (``foreign="inert"`` only for structural checks: restricted_pickle.py). LegacyTorchFormat for a file in
    torch's legacy format (formats/torch_legacy.py reads those)."""
    try:
        directory = read_zip_directory(source)
    except IntegrityError:
        if is_legacy_torch(source):
            raise LegacyTorchFormat(
                f"{source.name}: torch's legacy (non-zip) format, which this reads only as a zip archive",
                url=source.location.url_of(source.rel),
                hint="ckptctl inspect reads it; re-save with torch.save(obj, path) for the zip format",
            ) from None
        raise
    prefix, pkl = _find_prefix(source, directory)
    data = read_member(source, pkl)
    try:
        obj = restricted_loads(data, foreign=foreign)
        records, aliases = tensor_records(obj)
    except IntegrityError as exc:
        # The same class (unsafe stays unsafe), now naming the file.
        raise type(exc)(
            f"{source.name}: data.pkl: {exc.message}", url=source.location.url_of(source.rel)
        ) from None
    return TorchArchive(source, directory, prefix, obj, records, aliases)
