"""PyTorch Distributed Checkpoint folders: ``.metadata`` plus ``__<rank>_<n>.distcp`` data files.

torch reads ``.metadata`` with plain ``pickle.load``, so a poisoned one runs code; here it goes through the
restricted unpickler (fixtures/dcp/README.md lists the classes). From it come every tensor's global shape and
dtype, the chunks each rank wrote (they must tile the tensor), and the data files referenced, whose listed
sizes must cover every item: one listing and one GET decide whether a DCP checkpoint is whole.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ckptctl.errors import IntegrityError, NotFoundError, TruncatedError
from ckptctl.formats.model import (
    MAX_DIMENSION,
    Defect,
    FileFact,
    Inspection,
    TensorInfo,
    checked_shape,
    nbytes_of,
    numel_of,
)
from ckptctl.formats.restricted_pickle import PickledObject, TorchDType, restricted_loads
from ckptctl.formats.source import FileSource
from ckptctl.formats.tensor_layout import Chunk, Range, TensorPlan, TensorSource, is_contiguous
from ckptctl.formats.torch_zip import TAIL_PROBE_BYTES, ZIP_MAGIC, read_torch_archive
from ckptctl.storage.location import FileEntry, Location

METADATA = ".metadata"
NON_MODEL_PREFIXES = ("optimizer.", "optim.", "lr_scheduler.", "train_state.", "dataloader.", "extra_state.")
_MAX_OVERLAP_CHECK = 256
_WHOLE_FILE_BYTES = 64 * 1024 * 1024
_EOCD = b"PK\x05\x06"


def is_dcp_dir(names: set[str]) -> bool:
    return METADATA in names or any(n.endswith(".distcp") for n in names)


def read_dcp_metadata(location: Location, rel: str) -> PickledObject:
    """The ``Metadata`` record of a DCP checkpoint, unpickled with the allow-list (never plain pickle)."""
    url = location.url_of(rel)
    data = location.read_bytes(rel)
    if not data:
        raise IntegrityError(f"{rel}: empty DCP metadata file", url=url)
    try:
        metadata = restricted_loads(data)
    except IntegrityError as exc:
        raise type(exc)(f"{rel}: {exc.message}", url=url) from None
    if not (isinstance(metadata, PickledObject) and metadata.qualname.endswith("metadata.Metadata")):
        raise IntegrityError(f"{rel}: does not hold a DCP Metadata record", url=url)
    return metadata


def _path_text(value: Any) -> str | None:
    """``checkpoint_id`` is pickled as a ``pathlib`` path: its parts are the constructor arguments."""
    if isinstance(value, PickledObject):
        return posixpath.join(*(str(a) for a in value.args)) if value.args else None
    return None if value is None else str(value)


def _dtype(properties: Any) -> str:
    state = properties.state if isinstance(properties, PickledObject) else None
    value = (
        state[0]
        if isinstance(state, tuple) and state
        else (state or {}).get("dtype")
        if isinstance(state, dict)
        else None
    )
    return value.name if isinstance(value, TorchDType) else "uint8"


Box = tuple[tuple[int, ...], tuple[int, ...]]
"""A chunk's global offsets and sizes."""


def _tensor_entry(name: str, entry: Any) -> tuple[str, str, tuple[int, ...], list[Box]] | None:
    """Name, dtype, global shape and chunks of one ``state_dict_metadata`` entry; None for a bytes item."""
    if not isinstance(entry, PickledObject) or not entry.qualname.endswith("TensorStorageMetadata"):
        return None
    size = checked_shape(tuple(entry.get("size") or ()), f"tensor {name[:200]!r}")
    what = f"tensor {name[:200]!r}: a chunk"
    chunks = [
        (checked_shape(tuple(c.get("offsets") or ()), what), checked_shape(tuple(c.get("sizes") or ()), what))
        for c in entry.get("chunks") or []
        if isinstance(c, PickledObject)
    ]
    return name, _dtype(entry.get("properties")), size, chunks


def chunk_defects(
    name: str, size: tuple[int, ...], chunks: list[Box], *, exhaustive: bool = False
) -> list[str]:
    """The chunks of a tensor must lie inside it and tile it: volumes add up and no two overlap (checked pair
    by pair: for inspect only up to 256 chunks, for a conversion always)."""
    problems = []
    for offsets, sizes in chunks:
        if (
            len(offsets) != len(size)
            or len(sizes) != len(size)
            or any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=False))
        ):
            problems.append(
                f"tensor {name!r}: chunk at {list(offsets)} size {list(sizes)} lies outside {list(size)}"
            )
    covered = sum(numel_of(s) for _, s in chunks)
    if covered != numel_of(size):
        problems.append(f"tensor {name!r}: chunks cover {covered} of {numel_of(size)} elements")
    elif exhaustive or len(chunks) <= _MAX_OVERLAP_CHECK:
        boxes = [c for c in chunks if numel_of(c[1]) > 0]
        for i, (oa, sa) in enumerate(boxes):
            for ob, sb in boxes[i + 1 :]:
                if all(a < b + lb and b < a + la for a, la, b, lb in zip(oa, sa, ob, sb, strict=False)):
                    problems.append(f"tensor {name!r}: chunks at {list(oa)} and {list(ob)} overlap")
    return problems


def _span(info: PickledObject) -> tuple[int, int]:
    """Offset and length of a ``_StorageInfo``; IntegrityError unless both are non-negative ints (a crafted
    file could put anything there)."""
    offset, length = info.get("offset") or 0, info.get("length") or 0
    if not (
        type(offset) is int
        and type(length) is int
        and 0 <= offset < MAX_DIMENSION
        and 0 <= length < MAX_DIMENSION
    ):
        raise IntegrityError(f"storage entry of {info.get('relative_path')!s:.80}: invalid offset or length")
    return offset, length


def _needed_sizes(infos: Iterable[Any], where: str) -> dict[str, int]:
    """Data file -> the bytes its items need (the end of the last one); every span checked (``where`` names
    the metadata file in the error)."""
    needed: dict[str, int] = {}
    for info in infos:
        if isinstance(info, PickledObject):
            path = str(info.get("relative_path"))
            try:
                offset, length = _span(info)
            except IntegrityError as exc:
                raise IntegrityError(f"{where}: {exc.message}", url=where) from None
            needed[path] = max(needed.get(path, 0), offset + length)
    return needed


def _file_defects(
    files: dict[str, FileEntry], needed: dict[str, int], by: str, *, mark_truncated: bool = False
) -> list[Defect]:
    """Data files missing from the listing, or shorter than their items need (``truncated`` set only when
    ``mark_truncated``: inspect reports these as plain defects)."""
    defects = []
    for path, end in sorted(needed.items()):
        if path not in files:
            defects.append(Defect(path, f"data file referenced by {by} is missing"))
        elif files[path].size < end:
            defects.append(
                Defect(
                    path, f"{files[path].size} bytes, {by} needs {end} (truncated)", truncated=mark_truncated
                )
            )
    return defects


def _item_defects(location: Location, files: dict[str, FileEntry], storage: dict[Any, Any]) -> list[Defect]:
    """Every tensor item of a data file is a whole torch.save zip: it starts with a local header and ends
    with its end-of-central-directory record. Files up to 64 MiB are read once; larger ones item by item."""
    sources: dict[str, FileSource] = {}
    defects: list[Defect] = []
    for info in storage.values():
        if not isinstance(info, PickledObject):
            continue
        path = str(info.get("relative_path"))
        start, length = _span(info)
        if path not in files or files[path].size < start + length:
            continue  # already reported as missing or truncated
        if path not in sources:
            sources[path] = FileSource(location, path, files[path].size)
            if files[path].size <= _WHOLE_FILE_BYTES:
                sources[path].read(0, files[path].size)
        source = sources[path]
        end = start + length
        if (
            length < 22
            or source.read(start, start + 4) != ZIP_MAGIC
            or source.read(end - 22, end - 18) != _EOCD
        ):
            defects.append(Defect(path, f"item at {start} (+{length}) is not a whole torch.save archive"))
    return defects


def inspect_dcp(location: Location, entries: Sequence[FileEntry], *, verify: bool = False) -> Inspection:
    """Describe a DCP checkpoint folder from its ``.metadata`` and the listing of its data files."""
    files = {e.path: e for e in entries if e.type == "file" and "/" not in e.path}
    if METADATA not in files:
        if any(PER_RANK_METADATA.match(n) for n in files):
            return _inspect_per_rank(location, files, verify=verify)
        raise IntegrityError(
            f"{location.url}: no .metadata (rank 0 writes it last: the save did not finish)", url=location.url
        )
    metadata = read_dcp_metadata(location, METADATA)
    state_dict = metadata.get("state_dict_metadata") or {}
    storage = metadata.get("storage_data") or {}
    tensors: list[TensorInfo] = []
    defects: list[Defect] = []
    bytes_items: list[str] = []
    chunk_counts: dict[str, int] = {}
    for name, entry in state_dict.items():
        parsed = _tensor_entry(str(name), entry)
        if parsed is None:
            bytes_items.append(str(name))
            continue
        name, dtype, size, chunks = parsed
        chunk_counts[name] = len(chunks)
        defects += [Defect(METADATA, p) for p in chunk_defects(name, size, chunks)]
        tensors.append(TensorInfo(name, dtype, size, nbytes_of(dtype, size), _role(name)))
    needed = _needed_sizes(storage.values(), location.url_of(METADATA))
    defects += _file_defects(files, needed, METADATA)
    if verify:
        defects += _item_defects(location, files, storage)
    unreferenced = sorted(n for n in files if n.endswith(".distcp") and n not in needed)
    storage_meta = metadata.get("storage_meta")
    facts = {
        "dcp": {
            "version": metadata.get("version"),
            "tensors": len(tensors),
            "bytes_items": len(bytes_items),
            "chunks": sum(chunk_counts.values()),
            "sharded_tensors": sum(1 for n in chunk_counts.values() if n > 1),
            "files_referenced": sorted(needed),
            "files_unreferenced": unreferenced,
            "checkpoint_id": _path_text(storage_meta.get("checkpoint_id"))
            if isinstance(storage_meta, PickledObject)
            else None,
        }
    }
    facts_files = [FileFact(METADATA, files[METADATA].size, "metadata")]
    facts_files += [FileFact(n, files[n].size, "data") for n in sorted(files) if n != METADATA]
    return Inspection(
        url=location.url,
        format="dcp",
        files=tuple(facts_files),
        tensors=tuple(tensors),
        metadata={"bytes_items": bytes_items},
        facts=facts,
        defects=tuple(defects),
        verified=verify,
    )


# -- tensors as chunks, for consolidate --------------------------------------------------------------------------

PER_RANK_METADATA = re.compile(r"^__(\d+)\.metadata$")
MODEL_WRAPPER = "model"
NON_MODEL_ROOTS = frozenset(p.rstrip(".") for p in NON_MODEL_PREFIXES)


@dataclass(frozen=True)
class DcpChunk:
    """One chunk of a tensor: where it lies in the global tensor, and the torch.save item that holds it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    rel: str
    """The data file (``__<rank>_<n>.distcp``)."""
    item_start: int
    item_length: int


@dataclass(frozen=True)
class DcpTensor:
    fqn: str
    path: tuple[Any, ...]
    """The key path into the saved state dict (``planner_data``): ``("model", "attn.wo.weight")``."""
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True)
class DcpCheckpoint:
    """Every tensor and bytes item of a DCP folder, from ``.metadata`` or from all per-rank ``__R.metadata``
    files merged; every chunk tiles its tensor and every data file is there (checked when read)."""

    location: Location
    metadata_files: tuple[str, ...]
    tensors: tuple[DcpTensor, ...]
    bytes_items: tuple[tuple[str, tuple[Any, ...]], ...]
    file_sizes: dict[str, int]
    """Size of every data file referenced (all present and large enough)."""


def _role(name: str) -> str:
    if name.startswith(("optimizer.", "optim.")):
        return "optimizer"
    return "other" if name.startswith(NON_MODEL_PREFIXES) else "param"


def _inspect_per_rank(location: Location, files: dict[str, FileEntry], *, verify: bool) -> Inspection:
    """A ``use_collectives=False`` save described from its per-rank metadata merged (``read_dcp_checkpoint``:
    a rank missing shows as chunks that do not tile, an IntegrityError). ``verify`` also checks every item of
    every data file, rank by rank."""
    checkpoint = read_dcp_checkpoint(location)
    tensors = [
        TensorInfo(t.fqn, t.dtype, t.shape, nbytes_of(t.dtype, t.shape), _role(t.fqn))
        for t in checkpoint.tensors
    ]
    defects: list[Defect] = []
    if verify:
        for rel in checkpoint.metadata_files:
            storage = read_dcp_metadata(location, rel).get("storage_data") or {}
            defects += _item_defects(location, files, storage)
    facts = {
        "dcp": {
            "metadata_files": list(checkpoint.metadata_files),
            "use_collectives": False,
            "tensors": len(tensors),
            "bytes_items": len(checkpoint.bytes_items),
            "chunks": sum(len(t.chunks) for t in checkpoint.tensors),
            "sharded_tensors": sum(1 for t in checkpoint.tensors if len(t.chunks) > 1),
            "files_referenced": sorted(checkpoint.file_sizes),
            "files_unreferenced": sorted(
                n for n in files if n.endswith(".distcp") and n not in checkpoint.file_sizes
            ),
        }
    }
    metadata_set = set(checkpoint.metadata_files)
    facts_files = [FileFact(n, files[n].size, "metadata") for n in checkpoint.metadata_files]
    facts_files += [FileFact(n, files[n].size, "data") for n in sorted(files) if n not in metadata_set]
    return Inspection(
        url=location.url,
        format="dcp",
        files=tuple(facts_files),
        tensors=tuple(tensors),
        metadata={"bytes_items": [name for name, _ in checkpoint.bytes_items]},
        facts=facts,
        defects=tuple(defects),
        verified=verify,
        notes=("saved with use_collectives=False: described from the per-rank metadata files merged",),
    )


def find_dcp_folder(entries: Sequence[FileEntry], tag: str | None) -> str | None:
    """The DCP checkpoint folder (relative) among ``entries``: the top level, ``tag``, or the only sub-folder
    holding a ``.metadata`` (torchtitan ``step-N/``; Accelerate's ``pytorch_model_fsdp_0/``, preferred over its
    ``optimizer_0/``). None when nothing here is DCP; NotFoundError when several are and no ``tag`` says which."""
    by_folder: dict[str, set[str]] = {}
    for entry in entries:
        if entry.type == "file":
            folder, _, name = entry.path.rpartition("/")
            by_folder.setdefault(folder, set()).add(name)

    def is_dcp(names: set[str]) -> bool:
        return is_dcp_dir(names) or any(PER_RANK_METADATA.match(n) for n in names)

    if tag is not None:
        return tag if is_dcp(by_folder.get(tag, set())) else None
    if is_dcp(by_folder.get("", set())):
        return ""
    found = sorted((f for f, names in by_folder.items() if "/" not in f and is_dcp(names)), key=_natural)
    if "pytorch_model_fsdp_0" in found:
        return "pytorch_model_fsdp_0"
    if len(found) > 1:
        raise NotFoundError(
            f"several DCP checkpoints here ({', '.join(found)})", hint=f"pass --tag, e.g. --tag {found[-1]}"
        )
    return found[0] if found else None


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _storage_key(index: Any) -> tuple[str, tuple[int, ...]] | None:
    """``MetadataIndex`` compares by fqn and chunk offsets only (its ``index`` is a lookup hint)."""
    if not isinstance(index, PickledObject):
        return None
    offset = index.get("offset")
    return str(index.get("fqn")), tuple(offset) if isinstance(offset, (tuple, list)) else ()


def read_dcp_checkpoint(location: Location, entries: Sequence[FileEntry] | None = None) -> DcpCheckpoint:
    """The tensors of the DCP folder at ``location`` as chunks, checked whole before a byte of data is read.

    Per-rank ``__R.metadata`` files (``use_collectives=False``) are merged: each holds only its rank's chunks, a
    replicated tensor is in every one (the lowest rank's copy is used), and the ranks must agree on every
    tensor's dtype and global shape. Torch's own converter reads ``__0.metadata`` alone and returns the other
    ranks' rows uninitialised; here a tensor whose merged chunks do not tile it is an IntegrityError (a rank's
    metadata missing shows up that way). Costs one listing (none when ``entries``, the folder's listing, is
    given) plus one read per metadata file.
    """
    listing = location.walk() if entries is None else entries
    files = {e.path: e for e in listing if e.type == "file" and "/" not in e.path}
    if METADATA in files:
        names = [METADATA]
    else:
        names = sorted((n for n in files if PER_RANK_METADATA.match(n)), key=_natural)
    if not names:
        raise IntegrityError(
            f"{location.url}: no .metadata (rank 0 writes it last: the save did not finish)", url=location.url
        )
    shapes: dict[str, tuple[str, tuple[int, ...], str]] = {}
    chunks: dict[str, dict[Box, DcpChunk | None]] = {}
    paths: dict[str, tuple[Any, ...]] = {}
    bytes_items: dict[str, str] = {}
    needed: dict[str, int] = {}
    file_owner: dict[str, str] = {}
    for rel in names:
        metadata = read_dcp_metadata(location, rel)
        storage_infos = metadata.get("storage_data") or {}
        storage = {_storage_key(k): v for k, v in storage_infos.items() if isinstance(v, PickledObject)}
        for path, end in _needed_sizes(storage.values(), location.url_of(rel)).items():
            if file_owner.setdefault(path, rel) != rel:
                raise IntegrityError(
                    f"{location.url}: {file_owner[path]} and {rel} both name {path}: the rank files cannot be merged",
                    url=location.url,
                )
            needed[path] = end
        planner = metadata.get("planner_data") or {}
        for fqn, entry in (metadata.get("state_dict_metadata") or {}).items():
            name = str(fqn)
            raw_path = planner.get(fqn) if isinstance(planner, dict) else None
            paths.setdefault(name, tuple(raw_path) if isinstance(raw_path, (tuple, list)) else (name,))
            parsed = _tensor_entry(name, entry)
            if parsed is None:
                if name in shapes:
                    raise _unmergeable(location, name, "a tensor", shapes[name][2], "a bytes item", rel)
                bytes_items.setdefault(name, rel)
                continue
            _, dtype, size, boxes = parsed
            if name in bytes_items:
                raise _unmergeable(location, name, "a bytes item", bytes_items[name], "a tensor", rel)
            known = shapes.setdefault(name, (dtype, size, rel))
            if known[:2] != (dtype, size):
                raise _unmergeable(
                    location, name, f"{known[0]} {list(known[1])}", known[2], f"{dtype} {list(size)}", rel
                )
            mine = chunks.setdefault(name, {})
            for box in boxes:
                if box in mine:
                    continue  # a replica another rank wrote too
                info = storage.get((name, box[0]))
                mine[box] = (
                    None  # refused below, after the tiling check that explains more
                    if info is None
                    else DcpChunk(box[0], box[1], str(info.get("relative_path")), *_span(info))
                )
    by = names[0] if len(names) == 1 else "the per-rank metadata"
    defects = _file_defects(files, needed, by, mark_truncated=True)
    if defects:
        error = TruncatedError if defects[0].truncated else IntegrityError
        raise error(f"{location.url_of(defects[0].file)}: {defects[0].message}", url=location.url)
    tensors = []
    for name, (dtype, size, _) in shapes.items():
        problems = chunk_defects(name, size, list(chunks[name]), exhaustive=True)
        if problems:
            merged = (
                " (per-rank metadata merged: a rank's __R.metadata may be missing)"
                if names[0] != METADATA
                else ""
            )
            raise IntegrityError(f"{location.url}: {problems[0]}{merged}", url=location.url)
        located = tuple(c for c in chunks[name].values() if c is not None)
        if len(located) != len(chunks[name]):
            missing = next(list(box[0]) for box, c in chunks[name].items() if c is None)
            raise IntegrityError(
                f"{location.url}: tensor {name!r}: no storage entry for the chunk at {missing}",
                url=location.url,
            )
        tensors.append(DcpTensor(name, paths[name], dtype, size, located))
    return DcpCheckpoint(
        location,
        tuple(names),
        tuple(tensors),
        tuple((n, paths[n]) for n in bytes_items),
        {path: files[path].size for path in needed},
    )


def _unmergeable(location: Location, name: str, was: str, where: str, now: str, rel: str) -> IntegrityError:
    return IntegrityError(
        f"{location.url}: {name!r} is {was} in {where} but {now} in {rel}: the rank files cannot be merged",
        url=location.url,
    )


def model_names(paths: Iterable[tuple[str, tuple[Any, ...]]]) -> dict[str, str]:
    """fqn -> the name ``model.state_dict()`` had, for the entries that are model weights.

    A ``{"model": ...}`` wrapper (the DCP tutorial, Accelerate FSDP) is recognised by its key path (the
    planner data), not by the name: torchtitan saves model FQNs at the top level, and a model may well have a
    top-level ``model.`` sub-module of its own (HF ``LlamaForCausalLM``). Without a wrapper, the sub-trees of
    training state (``optimizer``, ``lr_scheduler``, ``dataloader``, ``train_state``…) are left out.
    """
    entries = list(paths)
    wrapped = any(len(path) > 1 and path[0] == MODEL_WRAPPER for _, path in entries)
    if wrapped:
        cut = len(MODEL_WRAPPER) + 1
        return {fqn: fqn[cut:] for fqn, path in entries if path[0] == MODEL_WRAPPER and len(path) > 1}
    return {fqn: fqn for fqn, path in entries if str(path[0]) not in NON_MODEL_ROOTS}


# An item's zip metadata lies in its first and last few KB: data.pkl and the small members torch writes before
# the storage, and the central directory after it (torch_zip.TAIL_PROBE_BYTES is read from the end).
_ITEM_HEAD_BYTES = 4096
_ITEM_TAIL_BYTES = TAIL_PROBE_BYTES


class _ItemWindow(Location):
    """One item of a data file seen as a file of its own (torch.save zip offsets count from the item's start),
    read through the data file's shared, prefetched ``FileSource``."""

    def __init__(self, file: FileSource, start: int, length: int) -> None:
        super().__init__(file.location.fs, file.location.root, file.location.url)
        self._file = file
        self._start = start
        self._length = length

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        end = min(end, self._length)
        return self._file.read(self._start + start, self._start + end) if end > start else b""


def chunk_byte_range(file: FileSource, tensor: DcpTensor, chunk: DcpChunk) -> Range:
    """Where a chunk's elements lie in its data file ``file``: its item is a torch.save zip read through the
    restricted unpickler, which must hold one C-contiguous tensor of the chunk's sizes and the tensor's dtype.
    Reads only the item's head and tail (from ``file``'s cache when prefetched)."""
    url = file.location.url_of(chunk.rel)
    source = FileSource(_ItemWindow(file, chunk.item_start, chunk.item_length), chunk.rel, chunk.item_length)
    try:
        archive = read_torch_archive(source)
    except IntegrityError as exc:
        raise type(exc)(
            f"{url}: item of tensor {tensor.fqn!r} at {chunk.item_start}: {exc.message}", url=url
        ) from None
    records = archive.tensors
    record = records[0] if len(records) == 1 else None
    if (
        record is None
        or record.path != ()
        or record.shape != chunk.sizes
        or record.dtype != tensor.dtype
        or not is_contiguous(record.shape, record.stride)
    ):
        found = f"{record.dtype} {list(record.shape)}" if record else f"{len(records)} tensors"
        raise IntegrityError(
            f"{url}: item at {chunk.item_start} should hold chunk {list(chunk.offsets)} of tensor {tensor.fqn!r} "
            f"({tensor.dtype} {list(chunk.sizes)}), it holds {found}",
            url=url,
        )
    start = archive.tensor_byte_offset(record)
    end = start + nbytes_of(record.dtype, record.shape)
    if end > chunk.item_length:
        raise TruncatedError(
            f"{url}: item of tensor {tensor.fqn!r} at {chunk.item_start} is cut short", url=url
        )
    return Range(chunk.rel, chunk.item_start + start, chunk.item_start + end)


def locate_chunks(checkpoint: DcpCheckpoint, tensors: Iterable[DcpTensor]) -> dict[str, tuple[Chunk, ...]]:
    """fqn -> the chunks of each of ``tensors`` with the byte ranges of their elements (empty chunks, FSDP2's
    last ranks, hold no bytes and are left out).

    One data file at a time, the heads and tails of all its wanted items are fetched first, merged into few
    ranged reads (over an object store: about one GET per large item, one per file of small ones), and let go
    before the next file: memory is ~20 KB per item of one file, never tensor data.
    """
    wanted = list(tensors)
    by_file: dict[str, list[tuple[DcpTensor, DcpChunk]]] = {}
    for tensor in wanted:
        for chunk in tensor.chunks:
            if numel_of(chunk.sizes) > 0:
                by_file.setdefault(chunk.rel, []).append((tensor, chunk))
    ranges: dict[tuple[str, tuple[int, ...]], Range] = {}
    for rel, items in by_file.items():
        file = FileSource(checkpoint.location, rel, checkpoint.file_sizes[rel])
        spans = []
        for _, chunk in items:
            start, end = chunk.item_start, chunk.item_start + chunk.item_length
            if chunk.item_length <= 2 * _ITEM_TAIL_BYTES:
                spans.append((start, end))  # FileSource.tail reads a small item whole
            else:
                spans += [(start, start + _ITEM_HEAD_BYTES), (end - _ITEM_TAIL_BYTES, end)]
        file.prefetch(spans)
        for tensor, chunk in items:
            ranges[(tensor.fqn, chunk.offsets)] = chunk_byte_range(file, tensor, chunk)
    return {
        t.fqn: tuple(
            Chunk(c.offsets, c.sizes, ranges[(t.fqn, c.offsets)]) for c in t.chunks if numel_of(c.sizes) > 0
        )
        for t in wanted
    }


def plan_dcp(location: Location, folder: str, entries: Sequence[FileEntry] | None = None) -> TensorPlan:
    """The model weights of the DCP checkpoint in ``folder`` of ``location`` (formats/dcp.py ``model_names``),
    each tensor's chunks located in the data files before anything is written: a damaged item fails the plan,
    not a half-written output. Byte ranges are relative to ``location``, as the writer reads them.
    ``entries``: the location's listing when the caller has one (else the folder is listed)."""
    base = f"{folder}/" if folder else ""
    inside = (
        None
        if entries is None
        else [replace(e, path=e.path[len(base) :]) for e in entries if e.path.startswith(base)]
    )
    checkpoint = read_dcp_checkpoint(location.child(folder) if folder else location, inside)
    names = model_names([(t.fqn, t.path) for t in checkpoint.tensors] + list(checkpoint.bytes_items))
    model = [t for t in checkpoint.tensors if t.fqn in names]
    located = locate_chunks(checkpoint, model)
    tensors = [
        TensorSource(
            location,
            names[t.fqn],
            t.dtype,
            t.shape,
            chunks=tuple(replace(c, range=replace(c.range, rel=base + c.range.rel)) for c in located[t.fqn]),
        )
        for t in model
    ]
    plan = TensorPlan(
        folder or posixpath.basename(location.root),
        "dcp",
        tensors,
        dropped=len(checkpoint.tensors) - len(tensors),
        non_tensors=[names[n] for n, _ in checkpoint.bytes_items if n in names],
    )
    if checkpoint.metadata_files[0] != METADATA:
        plan.warnings.append(
            f"saved with use_collectives=False: merged {len(checkpoint.metadata_files)} per-rank metadata files"
        )
    if plan.non_tensors:
        shown = ", ".join(plan.non_tensors[:5]) + ("..." if len(plan.non_tensors) > 5 else "")
        plan.warnings.append(
            f"{len(plan.non_tensors)} non-tensor item(s) left out (never unpickled): {shown}"
        )
    return plan
