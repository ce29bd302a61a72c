"""torch.save zip archives (``.pt``, ``.bin``, ``.pth``, ``.ckpt``, DeepSpeed ``*_states.pt``), read torch-free.

The layout (shared/notes/formats.md §2): ``<stem>/data.pkl`` first, one STORED ``<stem>/data/<key>`` member per
storage (64-byte aligned), the central directory last. So two ranged reads list a file of any size: the tail
(end-of-central-directory record + central directory) and then ``data.pkl``, which the restricted unpickler turns
into ``TensorRef`` records without running anything. The archive also tells where each storage's bytes start,
for readers that stream tensor data later (``consolidate``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptctl.errors import BackendNotInstalledError, IntegrityError
from ckptctl.formats.model import DTYPE_BITS, Defect, TensorInfo, nbytes_of, numel_of
from ckptctl.formats.restricted_pickle import PickledObject, TensorRef, restricted_loads
from ckptctl.formats.source import PROBE_BYTES, FileSource

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_LOCAL_HEADER = 30
_CENTRAL_HEADER = 46
ZIP_MAGIC = _LOCAL
# torch's legacy (non-zip) format starts with a protocol-2 pickle of this magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
# Extra bytes read after a local header's name: torch pads with an extra field of up to 64 + 4 bytes.
_LOCAL_EXTRA_GUESS = 128
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


def read_zip_directory(source: FileSource) -> ZipDirectory:
    """The central directory, from the file's tail (one ranged read, two when the directory is larger)."""
    if source.size < 22:
        raise _bad(source, f"{source.size} bytes: too short for a zip archive (empty or truncated)")
    tail_start, tail = source.tail(TAIL_PROBE_BYTES)
    pos = tail.rfind(_EOCD)
    while pos >= 0 and len(tail) - pos < 22:
        pos = tail.rfind(_EOCD, 0, pos)
    if pos < 0:
        raise _bad(source, "no zip end-of-central-directory record (truncated, or not a zip archive)")
    eocd_offset = tail_start + pos
    entries, cd_size, cd_offset = struct.unpack("<10xHII", tail[pos : pos + 20])
    if 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        entries, cd_size, cd_offset = _zip64_end(source, tail, tail_start, pos)
    if cd_offset + cd_size > eocd_offset:
        raise _bad(
            source, f"zip central directory ({cd_offset}+{cd_size}) runs past its end record (corrupt)"
        )
    cd_end = cd_offset + cd_size
    if cd_offset >= tail_start:
        directory = tail[cd_offset - tail_start : cd_end - tail_start]
    else:  # only the part of the directory the tail did not hold
        directory = source.read(cd_offset, tail_start) + tail[: cd_end - tail_start]
    members = list(_parse_central(source, directory, entries))
    return ZipDirectory(tuple(members), cd_offset, cd_size, eocd_offset)


def _zip64_end(source: FileSource, tail: bytes, tail_start: int, pos: int) -> tuple[int, int, int]:
    loc = pos - 20
    if loc < 0 or tail[loc : loc + 4] != _EOCD64_LOCATOR:
        raise _bad(source, "zip64 end record locator missing (corrupt)")
    (eocd64_offset,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
    if tail_start <= eocd64_offset <= tail_start + len(tail) - 56:
        record = tail[eocd64_offset - tail_start : eocd64_offset - tail_start + 56]
    else:
        record = source.read(eocd64_offset, eocd64_offset + 56)
    if record[:4] != _EOCD64:
        raise _bad(source, "zip64 end-of-central-directory record missing (corrupt)")
    entries, cd_size, cd_offset = struct.unpack("<8xQQQ", record[24:56])
    return entries, cd_size, cd_offset


def _parse_central(source: FileSource, data: bytes, entries: int) -> Iterator[ZipMember]:
    pos = 0
    for _ in range(entries):
        if data[pos : pos + 4] != _CENTRAL:
            raise _bad(source, f"zip central directory entry at +{pos} is corrupt")
        (method, csize, usize, nlen, elen, clen, offset) = struct.unpack(
            "<10xH8xIIHHH8xI", data[pos : pos + _CENTRAL_HEADER]
        )
        name = data[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        extra = data[pos + 46 + nlen : pos + 46 + nlen + elen]
        if 0xFFFFFFFF in (csize, usize, offset):
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
        yield ZipMember(name, method, csize, usize, offset)
        pos += _CENTRAL_HEADER + nlen + elen + clen


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[pos : pos + 4])
        if tag == 1:
            values = iter(struct.unpack(f"<{length // 8}Q", extra[pos + 4 : pos + 4 + length - length % 8]))
            usize = next(values) if usize == 0xFFFFFFFF else usize
            csize = next(values) if csize == 0xFFFFFFFF else csize
            offset = next(values) if offset == 0xFFFFFFFF else offset
            break
        pos += 4 + length
    return usize, csize, offset


def member_data_offset(source: FileSource, member: ZipMember) -> int:
    """Where a member's bytes start: after its local header, whose extra field (torch's alignment padding)
    differs from the central directory's, so the local header is read (from cache when already fetched)."""
    start = member.header_offset
    header = source.read(start, start + _LOCAL_HEADER)
    if header[:4] != _LOCAL:
        raise _bad(source, f"member {member.name}: no local header at {start} (corrupt)")
    nlen, elen = struct.unpack("<HH", header[26:30])
    return start + _LOCAL_HEADER + nlen + elen


def read_member(source: FileSource, member: ZipMember) -> bytes:
    """A member's bytes: one ranged read covering its local header and data (a second if the guess missed)."""
    start = member.header_offset
    source.read(
        start, start + _LOCAL_HEADER + len(member.name.encode()) + _LOCAL_EXTRA_GUESS + member.compressed_size
    )
    begin = member_data_offset(source, member)
    data = source.read(begin, begin + member.compressed_size)
    if len(data) != member.compressed_size:
        raise _bad(source, f"member {member.name} runs past the end of the file (truncated)")
    if member.method == 0:
        return data
    if member.method == 8:
        return zlib.decompress(data, -15)
    raise _bad(source, f"member {member.name}: unsupported zip compression method {member.method}")


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
        for record in self.tensors:
            storage = self.storage_member(record.storage_key)
            if storage is None:
                defects.append(
                    Defect(file, f"tensor {record.name}: storage data/{record.storage_key} missing")
                )
                continue
            if record.numel == 0:
                continue
            last = record.storage_offset + sum(
                (d - 1) * s for d, s in zip(record.shape, record.stride, strict=False)
            )
            needed = (last + 1) * record.itemsize
            if needed > storage.size:
                defects.append(
                    Defect(
                        file,
                        f"tensor {record.name}: needs {needed} bytes of data/{record.storage_key}, "
                        f"member has {storage.size}",
                    )
                )
        return defects


def _find_prefix(source: FileSource, directory: ZipDirectory) -> tuple[str, ZipMember]:
    pickles = [m for m in directory.members if m.name.endswith("/data.pkl") and m.name.count("/") == 1]
    if len(pickles) != 1:
        raise _bad(source, "a zip archive, but not a torch checkpoint (no single <name>/data.pkl)")
    return pickles[0].name[: -len("/data.pkl")], pickles[0]


class LegacyTorchFormat(BackendNotInstalledError):
    """A torch file in the pre-1.6 non-zip format: no central directory to read without torch."""

    code = "legacy_torch_format"


def is_legacy_torch(source: FileSource) -> bool:
    return source.size >= len(LEGACY_MAGIC) and source.head(PROBE_BYTES).startswith(LEGACY_MAGIC)


def tensor_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


MAX_DEPTH = 64


def iter_tensors(
    obj: Any, path: tuple[Any, ...] = (), _active: set[int] | None = None
) -> Iterator[tuple[tuple[Any, ...], TensorRef]]:
    """Every tensor in an unpickled object tree, depth first, with its path of keys.

    A pickle can build cycles and arbitrarily deep nesting: both are refused rather than followed.
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
    if id(obj) in active or len(path) > MAX_DEPTH:
        raise IntegrityError(f"object nested too deeply or in a cycle at {tensor_name(path)[:200]!r}")
    active.add(id(obj))
    for key, value in items:
        yield from iter_tensors(value, (*path, key), active)
    active.discard(id(obj))


def read_torch_archive(source: FileSource) -> TorchArchive:
    """List a torch archive: zip directory from the tail, ``data.pkl`` through the restricted unpickler."""
    try:
        directory = read_zip_directory(source)
    except IntegrityError:
        if is_legacy_torch(source):
            raise LegacyTorchFormat(
                f"{source.name}: torch's legacy (non-zip) format: listing it needs torch",
                url=source.location.url_of(source.rel),
                hint="install torch; ckptctl then reads it with torch.load(weights_only=True) (local files only)",
            ) from None
        raise
    prefix, pkl = _find_prefix(source, directory)
    data = read_member(source, pkl)
    try:
        obj = restricted_loads(data)
    except IntegrityError as exc:
        # The same class (unsafe stays unsafe), now naming the file.
        raise type(exc)(
            f"{source.name}: data.pkl: {exc.message}", url=source.location.url_of(source.rel)
        ) from None
    records: list[TensorRecord] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    try:
        found = list(iter_tensors(obj))
    except IntegrityError as exc:
        raise _bad(source, exc.message) from None
    for path, ref in found:
        if not all(isinstance(d, int) and d >= 0 for d in (*ref.shape, ref.storage_offset)) or not all(
            isinstance(d, int) for d in ref.stride
        ):
            raise _bad(source, f"tensor {tensor_name(path)!r} has an invalid shape, stride or offset")
        name = tensor_name(path)
        record = TensorRecord(
            path,
            name,
            ref.dtype,
            ref.shape,
            ref.stride,
            ref.storage.key,
            ref.storage_offset,
            ref.storage.numel,
            ref.storage.dtype,
            ref.requires_grad,
        )
        view = (ref.storage.key, ref.storage_offset, ref.shape, ref.stride, ref.dtype)
        if view in seen and record.numel > 0:
            aliases[name] = seen[view]
        else:
            seen.setdefault(view, name)
        records.append(record)
    return TorchArchive(source, directory, prefix, obj, tuple(records), aliases)


OPTIMIZER_KEYS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optimizer_states",
        "optimizer_state_dict",
        "optim",
        "base_optimizer_state",
        "single_partition_of_fp32_groups",
        "fp32_flat_groups",
    }
)
MODEL_KEYS = frozenset({"state_dict", "model", "module", "model_state_dict"})


def tensor_infos(archive: TorchArchive, file: str | None = None) -> tuple[TensorInfo, ...]:
    """The archive's tensors as ``inspect`` shows them, with a role guessed from where they sit: under an
    optimizer key they are optimizer state; when the top level has a model key, only tensors below it are
    parameters and the rest is other training state."""
    top_has_model = isinstance(archive.obj, dict) and any(k in MODEL_KEYS for k in archive.obj)
    infos = []
    for record in archive.tensors:
        if any(str(p) in OPTIMIZER_KEYS for p in record.path):
            role = "optimizer"
        elif top_has_model and str(record.path[0]) not in MODEL_KEYS:
            role = "other"
        else:
            role = "param"
        infos.append(
            TensorInfo(
                record.name,
                record.dtype,
                record.shape,
                nbytes_of(record.dtype, record.shape),
                role,
                archive.aliases.get(record.name),
                file,
            )
        )
    return tuple(infos)
