"""torch's legacy serialization (``torch.save(..., _use_new_zipfile_serialization=False)``, every file from
torch < 1.6), read torch-free.

The file is consecutive pickles, then raw data (torch/serialization.py ``_legacy_save``; notes §7.4): the magic
number ``0x1950a86a20f9469cfc6c``, the protocol version 1001, a sys-info dict (byte order, type sizes), the object
(tensors are persistent ids ``('storage', storage type, key, location, numel, view metadata)``), the list of
storage keys; then, for each key in that order, the element count as 8 bytes and ``numel × element size`` bytes.
With the default protocol 2 the file starts with the 15 bytes of ``LEGACY_MAGIC``.

So the pickles alone say how long the file must be: the size check needs no read beyond them. There is no
trailer, so that sum is the only truncation proof this format has; the 8-byte counts, read at the offsets the
sum predicts, tell a cut file (every count readable matches) from a damaged one (they do not).

Cost over an object store: the pickles sit at the start, so one read of ``PROBE_BYTES`` lists a file with a
pickle up to that size (a larger one costs a read of 1 MiB, then reads growing eightfold); checking the counts
(``--verify``, or when the file is short) costs one read per run of storages closer than ``MERGE_GAP``.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptctl.errors import IntegrityError, TruncatedError
from ckptctl.formats.model import DTYPE_BITS, Defect
from ckptctl.formats.restricted_pickle import (
    MAX_PICKLE_BYTES,
    Foreign,
    RestrictedUnpickler,
    StorageRef,
    restricted_load,
)
from ckptctl.formats.source import PROBE_BYTES, FileSource
from ckptctl.formats.torch_zip import TensorRecord, tensor_records, view_defects

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
LEGACY_MAGIC = pickle.dumps(MAGIC_NUMBER, protocol=2)
# torch.save(pickle_protocol=N) writes the magic with that protocol; 2 is the default.
LEGACY_MAGICS = tuple(pickle.dumps(MAGIC_NUMBER, protocol=p) for p in (2, 3, 4, 5))
_GROWTH_START = 1024 * 1024
_GROWTH_FACTOR = 8
_MAX_COUNT_DEFECTS = 5


def is_legacy_head(head: bytes) -> bool:
    """Whether a file's first bytes are torch's legacy magic pickle."""
    return head.startswith(LEGACY_MAGICS)


def is_cut_magic(head: bytes) -> bool:
    """A file shorter than the magic whose bytes are its beginning: a legacy file cut inside its first pickle."""
    return bool(head) and any(m.startswith(head) and len(head) < len(m) for m in LEGACY_MAGICS)


@dataclass(frozen=True)
class LegacyStorage:
    """One storage of the data section: its 8-byte count at ``count_offset``, then ``numel × itemsize`` bytes."""

    key: str
    dtype: str | None
    numel: int
    itemsize: int
    count_offset: int

    @property
    def data_offset(self) -> int:
        return self.count_offset + 8

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def end(self) -> int:
        return self.data_offset + self.nbytes


@dataclass(frozen=True)
class LegacyTorchFile:
    """A walked legacy file: the unpickled object (inert records), its tensors, and its data section's layout."""

    source: FileSource
    obj: Any
    tensors: tuple[TensorRecord, ...]
    aliases: dict[str, str]
    data_start: int
    """Where the data section (the first storage's count) starts: the pickles end here."""
    storages: tuple[LegacyStorage, ...]
    """In file order (the pickled list of keys)."""
    little_endian: bool = True
    unknown: str | None = None
    """Why the data section's size cannot be computed (a key no tensor references, an unknown storage type);
    None when ``expected_size`` is exact."""
    conflicts: tuple[str, ...] = ()
    """Storage keys the pickle references with two different sizes or types."""
    _by_key: dict[str, LegacyStorage] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_key.update({s.key: s for s in self.storages})

    @property
    def expected_size(self) -> int | None:
        if self.unknown is not None:
            return None
        return self.storages[-1].end if self.storages else self.data_start

    def storage(self, key: str) -> LegacyStorage | None:
        return self._by_key.get(key)

    def storage_data_offset(self, key: str) -> int:
        """Absolute offset in the file where storage ``key``'s bytes start (no read: the sizes say it)."""
        storage = self.storage(key)
        if storage is None or self.unknown is not None:
            raise IntegrityError(f"{self.source.name}: storage {key} is not in the file's data section")
        return storage.data_offset

    def tensor_byte_offset(self, record: TensorRecord) -> int:
        """Absolute offset of a tensor's first element (for streaming its bytes without torch)."""
        return self.storage_data_offset(record.storage_key) + record.storage_offset * record.itemsize

    def check(self, counts: Literal["cached", "all"] = "cached") -> list[Defect]:
        """The structural checks of the data section: the storages' sizes must reach exactly the end of the file
        and each 8-byte count must match its storage. ``counts="cached"`` reads no count that is not in memory
        already, except when the file is short (then every count inside the file is read, to tell a cut file
        from a damaged one); ``"all"`` reads every count (``inspect --verify``)."""
        file = self.source.rel or self.source.location.url
        defects = [
            Defect(file, f"storage {key} is referenced with two different sizes or types (corrupt)")
            for key in self.conflicts
        ]
        sizes = {s.key: s.nbytes for s in self.storages}
        defects += view_defects(self.tensors, sizes.get, file)
        expected = self.expected_size
        if expected is None:
            return defects
        short = expected > self.source.size
        inside = [s for s in self.storages if s.data_offset <= self.source.size]
        if counts == "all" or short:
            self.source.prefetch((s.count_offset, s.data_offset) for s in inside)
        mismatched = []
        order = "<q" if self.little_endian else ">q"
        for storage in inside:
            raw = self.source.cached(storage.count_offset, storage.data_offset)
            if raw is None or len(raw) != 8:
                continue
            (count,) = struct.unpack(order, raw)
            if count != storage.numel:
                mismatched.append(
                    f"storage {storage.key}: the file counts {count} elements, the pickle {storage.numel}"
                )
        defects += [Defect(file, f"{m} (corrupt)") for m in mismatched[:_MAX_COUNT_DEFECTS]]
        if len(mismatched) > _MAX_COUNT_DEFECTS:
            defects.append(Defect(file, f"{len(mismatched) - _MAX_COUNT_DEFECTS} more storage counts differ"))
        if short:
            defects.append(
                Defect(
                    file,
                    f"data cut short: the storages need {expected} bytes, the file has {self.source.size}"
                    + (" (truncated)" if not mismatched else ""),
                    truncated=not mismatched and not self.conflicts,
                )
            )
        return defects

    @property
    def trailing_bytes(self) -> int:
        """Bytes after the last storage (torch.load ignores them; 0 when the size is unknown)."""
        expected = self.expected_size
        return max(0, self.source.size - expected) if expected is not None else 0


def _load_one(
    stream: io.BytesIO, *, foreign: Foreign = "refuse", unpickler: list[RestrictedUnpickler] | None = None
) -> Any:
    """``restricted_load``, except that a failure once every byte of ``stream`` is consumed is a TruncatedError:
    a GLOBAL opcode whose name the prefix (or the file) cuts reads a shortened name (``collections.Ordere``),
    which would otherwise be refused as off the allow-list, though more bytes may complete it."""
    try:
        value = restricted_load(stream, foreign=foreign, unpickler=unpickler)
    except IntegrityError:
        if stream.tell() >= len(stream.getbuffer()):
            raise TruncatedError("the pickle ends before its STOP opcode (truncated)") from None
        raise
    return value


def _walk_pickles(
    source: FileSource, prefix: bytes, foreign: Foreign
) -> tuple[Any, list[str], RestrictedUnpickler, int, bool]:
    """The five pickles of ``prefix``: (object, storage keys, the object's unpickler, data start, byte order)."""
    stream = io.BytesIO(prefix)
    if _load_one(stream) != MAGIC_NUMBER:
        raise IntegrityError(f"{source.name}: not torch's legacy format (no magic number)")
    version = _load_one(stream)
    if version != PROTOCOL_VERSION:
        raise IntegrityError(f"{source.name}: torch legacy protocol version {str(version)[:20]!r}, not 1001")
    sys_info = _load_one(stream)
    little_endian = not (isinstance(sys_info, dict) and sys_info.get("little_endian") is False)
    holder: list[RestrictedUnpickler] = []
    obj = _load_one(stream, foreign=foreign, unpickler=holder)
    keys = _load_one(stream)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise IntegrityError(f"{source.name}: the list of storage keys is not a list of names (corrupt)")
    return obj, keys, holder[0], stream.tell(), little_endian


def read_legacy_torch(source: FileSource, *, foreign: Foreign = "refuse") -> LegacyTorchFile:
    """Walk a legacy torch file's pickles (ranged reads of its start only) and lay out its data section.

    TruncatedError when the file ends inside the pickles; UnsafePickleError for a global off the allow-list
    (``foreign="inert"`` for structural checks only: restricted_pickle.py); IntegrityError otherwise. The
    sizes are checked by ``LegacyTorchFile.check``.
    """
    length = min(source.size, PROBE_BYTES)
    prefix = source.read(0, length)
    while True:
        try:
            obj, keys, unpickler, data_start, little_endian = _walk_pickles(source, prefix, foreign)
            break
        except TruncatedError:
            if len(prefix) >= source.size:
                raise TruncatedError(
                    f"{source.name}: the file ends inside its pickles at {source.size} bytes (truncated)",
                    url=source.location.url_of(source.rel),
                ) from None
            if len(prefix) >= MAX_PICKLE_BYTES:
                raise IntegrityError(
                    f"{source.name}: pickles longer than the {MAX_PICKLE_BYTES}-byte limit",
                    url=source.location.url_of(source.rel),
                ) from None
            grown = min(source.size, MAX_PICKLE_BYTES, max(_GROWTH_START, len(prefix) * _GROWTH_FACTOR))
            prefix += source.read(len(prefix), grown)
        except IntegrityError as exc:
            name = f"{source.name}: "
            message = exc.message if exc.message.startswith(name) else name + exc.message
            raise type(exc)(message, url=source.location.url_of(source.rel)) from None
    try:
        records, aliases = tensor_records(obj)
    except IntegrityError as exc:
        raise type(exc)(f"{source.name}: {exc.message}", url=source.location.url_of(source.rel)) from None
    storages: list[LegacyStorage] = []
    unknown = None
    offset = data_start
    for key in keys:
        ref: StorageRef | None = unpickler.storages.get(key)
        if ref is None:
            unknown = f"storage {key[:40]} is listed but no tensor references it: its size is unknown"
            break
        bits = DTYPE_BITS.get(ref.dtype or "uint8")
        if bits is None or bits % 8:
            unknown = f"storage {key[:40]} has elements of unknown size ({ref.dtype})"
            break
        storages.append(LegacyStorage(key, ref.dtype, ref.numel, bits // 8, offset))
        offset = storages[-1].end
    missing = set(unpickler.storages) - set(keys)
    if unknown is None and missing:
        unknown = f"storage {sorted(missing)[0][:40]} is referenced but not in the list of stored keys"
    return LegacyTorchFile(
        source,
        obj,
        records,
        aliases,
        data_start,
        tuple(storages),
        little_endian,
        unknown,
        tuple(unpickler.storage_conflicts),
    )
