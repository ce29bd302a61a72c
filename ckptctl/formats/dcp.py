"""PyTorch Distributed Checkpoint folders: ``.metadata`` plus ``__<rank>_<n>.distcp`` data files.

torch reads ``.metadata`` with plain ``pickle.load``, so a poisoned one runs code; here it goes through the
restricted unpickler (fixtures/dcp/README.md lists the classes). From it come every tensor's global shape and
dtype, the chunks each rank wrote (they must tile the tensor), and the data files referenced, whose listed
sizes must cover every item: one listing and one GET decide whether a DCP checkpoint is whole.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

from ckptctl.errors import IntegrityError
from ckptctl.formats.model import Defect, FileFact, Inspection, TensorInfo, checked_shape, nbytes_of, numel_of
from ckptctl.formats.restricted_pickle import PickledObject, TorchDType, restricted_loads
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_zip import ZIP_MAGIC
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


def _chunk_defects(
    name: str, size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> list[str]:
    """The chunks of a tensor must lie inside it and tile it: volumes add up and no two overlap."""
    problems = []
    for offsets, sizes in chunks:
        if len(offsets) != len(size) or any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=False)):
            problems.append(
                f"tensor {name!r}: chunk at {list(offsets)} size {list(sizes)} lies outside {list(size)}"
            )
    covered = sum(numel_of(s) for _, s in chunks)
    if covered != numel_of(size):
        problems.append(f"tensor {name!r}: chunks cover {covered} of {numel_of(size)} elements")
    elif len(chunks) <= _MAX_OVERLAP_CHECK:
        boxes = [c for c in chunks if numel_of(c[1]) > 0]
        for i, (oa, sa) in enumerate(boxes):
            for ob, sb in boxes[i + 1 :]:
                if all(a < b + lb and b < a + la for a, la, b, lb in zip(oa, sa, ob, sb, strict=False)):
                    problems.append(f"tensor {name!r}: chunks at {list(oa)} and {list(ob)} overlap")
    return problems


def _item_defects(location: Location, files: dict[str, FileEntry], storage: dict[Any, Any]) -> list[Defect]:
    """Every tensor item of a data file is a whole torch.save zip: it starts with a local header and ends
    with its end-of-central-directory record. Files up to 64 MiB are read once; larger ones item by item."""
    sources: dict[str, FileSource] = {}
    defects: list[Defect] = []
    for info in storage.values():
        if not isinstance(info, PickledObject):
            continue
        path = str(info.get("relative_path"))
        start, length = int(info.get("offset") or 0), int(info.get("length") or 0)
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
        per_rank = sorted(n for n in files if n.startswith("__") and n.endswith(".metadata"))
        what = (
            f"only per-rank {', '.join(per_rank)} (saved with use_collectives=False): no global .metadata"
            if per_rank
            else "no .metadata (rank 0 writes it last: the save did not finish)"
        )
        raise IntegrityError(f"{location.url}: {what}", url=location.url)
    metadata = read_dcp_metadata(location, METADATA)
    state_dict = metadata.get("state_dict_metadata") or {}
    storage = metadata.get("storage_data") or {}
    tensors: list[TensorInfo] = []
    defects: list[Defect] = []
    bytes_items: list[str] = []
    chunk_counts: dict[str, int] = {}
    for fqn, entry in state_dict.items():
        name = str(fqn)
        if not isinstance(entry, PickledObject) or not entry.qualname.endswith("TensorStorageMetadata"):
            bytes_items.append(name)
            continue
        size = checked_shape(tuple(entry.get("size") or ()), f"tensor {name[:200]!r}")
        dtype = _dtype(entry.get("properties"))
        chunks = [
            (tuple(c.get("offsets") or ()), tuple(c.get("sizes") or ()))
            for c in entry.get("chunks") or []
            if isinstance(c, PickledObject)
        ]
        chunk_counts[name] = len(chunks)
        defects += [Defect(METADATA, p) for p in _chunk_defects(name, size, chunks)]
        role = (
            "optimizer"
            if name.startswith(("optimizer.", "optim."))
            else ("other" if name.startswith(NON_MODEL_PREFIXES) else "param")
        )
        tensors.append(TensorInfo(name, dtype, size, nbytes_of(dtype, size), role))
    needed: dict[str, int] = {}
    for info in storage.values():
        if isinstance(info, PickledObject):
            path = str(info.get("relative_path"))
            end = int(info.get("offset") or 0) + int(info.get("length") or 0)
            needed[path] = max(needed.get(path, 0), end)
    for path, end in sorted(needed.items()):
        if path not in files:
            defects.append(Defect(path, "data file referenced by .metadata is missing"))
        elif files[path].size < end:
            defects.append(Defect(path, f"{files[path].size} bytes, .metadata needs {end} (truncated)"))
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
