"""``inspect``: what a checkpoint holds, from headers only, without torch and without running any pickle.

Accepts a file, a checkpoint folder, or a run plus a step. Every reader works through ``Location`` ranged
reads, so a checkpoint on S3 or GCS costs a listing and a couple of small GETs per file, whatever its size.
Cheap structural checks always run (they are how the headers are read); ``verify`` adds the ones that read
every file of the checkpoint.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import replace
from typing import Any

from ckptctl.errors import IntegrityError, NotFoundError, NothingRecognisedError, UsageError
from ckptctl.formats.dcp import inspect_dcp
from ckptctl.formats.deepspeed import inspect_deepspeed
from ckptctl.formats.detect import Format, format_of_bytes, format_of_dir, format_of_name
from ckptctl.formats.model import Defect, FileFact, Inspection, TensorInfo
from ckptctl.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_facts, read_adapter_config
from ckptctl.formats.restricted_pickle import TensorRef
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_zip import LegacyTorchFormat, read_torch_archive, tensor_infos
from ckptctl.storage.location import FileEntry, Location

__all__ = ["Inspection", "inspect_checkpoint", "inspect_location"]


def inspect_checkpoint(
    target: str,
    *,
    storage_options: dict[str, Any] | None = None,
    step: int | None = None,
    latest: bool = False,
    verify: bool = False,
) -> Inspection:
    """Inspect a file or checkpoint folder at ``target``, or (with ``step``/``latest``) one unit of the run
    at ``target`` as the catalog finds it."""
    location = Location.from_url(target, storage_options)
    if step is not None or latest:
        location = _unit_location(location, step)
    return inspect_location(location, verify=verify)


def _unit_location(run: Location, step: int | None) -> Location:
    from ckptctl.catalog.scan import scan_run

    scan = scan_run(run, settle_seconds=0)
    units = [u for u in scan.recognised if step is None or u.step == step]
    if step is None:
        # "Latest" is what a resume would load: the unit `latest` names, else the newest complete one (a
        # half-written newer save is not it), else the newest of any status.
        pointed = [u for u in units if "latest" in u.pointers]
        stepped = sorted((u for u in units if u.step is not None), key=lambda u: u.step or 0)
        complete = [u for u in stepped if u.is_complete]
        units = pointed or complete[-1:] or stepped[-1:]
    if not units:
        what = f"step {step}" if step is not None else "a latest checkpoint"
        raise NotFoundError(f"no checkpoint with {what} in {run.url}", url=run.url)
    if len(units) > 1:
        raise UsageError(
            f"{len(units)} checkpoints have step {step} in {run.url}: {', '.join(u.path for u in units)}",
            hint="inspect one of them by its path",
        )
    return run.child(units[0].path) if units[0].path else run


def _parent(location: Location) -> tuple[Location, str]:
    """The folder holding a file location, and the file's name in it."""
    name = posixpath.basename(location.root.rstrip("/"))
    url = location.url.rsplit("/", 1)[0] if "/" in location.url else "."
    return Location(location.fs, posixpath.dirname(location.root.rstrip("/")), url), name


def inspect_location(location: Location, *, verify: bool = False) -> Inspection:
    """Inspect whatever ``location`` is: one file (one HEAD) or a folder (one listing).

    The readers validate what they read; records of the wrong type in a crafted or damaged pickle that slip
    past them still end as an IntegrityError naming the checkpoint, never as a traceback.
    """
    try:
        return _inspect_location(location, verify=verify)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        raise IntegrityError(
            f"{location.url}: malformed checkpoint ({type(exc).__name__}: {exc})".splitlines()[0],
            url=location.url,
        ) from exc


def _inspect_location(location: Location, *, verify: bool) -> Inspection:
    entry = location.stat()
    if entry.type == "file":
        parent, name = _parent(location)
        return inspect_file(parent, FileEntry(name, "file", entry.size, entry.mtime), verify=verify)
    entries = location.walk()
    files = [e for e in entries if e.type == "file"]
    found = format_of_dir(e.path for e in files)
    if found is None:
        names = ", ".join(sorted(e.path for e in files if "/" not in e.path)[:5]) or "it is empty"
        raise NothingRecognisedError(
            f"{location.url}: no checkpoint recognised in this folder ({names})",
            url=location.url,
            hint="inspect takes a checkpoint file or folder (safetensors, torch, DeepSpeed, DCP, PEFT); "
            "for a run, add --step N or --latest",
        )
    kind, weights = found
    if kind is Format.DCP:
        return inspect_dcp(location, entries, verify=verify)
    if kind is Format.DEEPSPEED:
        return inspect_deepspeed(location, entries, verify=verify)
    if kind is Format.PEFT:
        return inspect_peft(location, {e.path: e for e in files}, verify=verify)
    assert weights is not None
    by_path = {e.path: e for e in files}
    if kind is Format.SAFETENSORS_SHARDED:
        result = inspect_sharded(location, by_path[weights], by_path, verify=verify)
    else:
        result = inspect_file(location, by_path[weights], verify=verify)
    read = {f.path for f in result.files}
    others = sorted(p for p in by_path if p not in read and "/" not in p)
    files_facts = (*result.files, *(FileFact(p, by_path[p].size, "other") for p in others))
    return replace(result, url=location.url, files=files_facts)


def inspect_file(location: Location, entry: FileEntry, *, verify: bool = False) -> Inspection:
    """Inspect one file of ``location`` (its size known from the listing: no HEAD)."""
    source = FileSource(location, entry.path, entry.size)
    kind = format_of_name(entry.name)
    if kind is None:
        if entry.size == 0:
            raise IntegrityError(f"{entry.path}: empty file", url=location.url_of(entry.path))
        kind = format_of_bytes(source.head(), entry.size)
    if kind is None:
        raise NothingRecognisedError(
            f"{location.url_of(entry.path)}: not a checkpoint file ckptctl can read",
            url=location.url_of(entry.path),
            hint="inspect reads safetensors, torch (.pt/.bin/.pth/.ckpt), DeepSpeed, DCP and PEFT checkpoints",
        )
    url = location.url_of(entry.path)
    if kind is Format.SAFETENSORS:
        header = read_safetensors_header(source)
        tensors = tuple(_with_file(t, entry.path) for t in header.tensors)
        return Inspection(
            url,
            kind.value,
            (FileFact(entry.path, entry.size, "weights"),),
            tensors,
            metadata=dict(header.metadata),
            defects=header.defects,
            verified=verify,
        )
    if kind is Format.SAFETENSORS_SHARDED:
        return inspect_sharded(location, entry, verify=verify)
    if kind is Format.DCP:
        parent = location
        return inspect_dcp(parent, parent.walk(), verify=verify)
    return inspect_torch_file(source, verify=verify)


def _with_file(tensor: TensorInfo, file: str) -> TensorInfo:
    return replace(tensor, file=file)


def inspect_torch_file(source: FileSource, *, verify: bool = False) -> Inspection:
    url = source.location.url_of(source.rel)
    try:
        archive = read_torch_archive(source)
    except LegacyTorchFormat:
        return _inspect_legacy_with_torch(source)
    top = archive.obj if isinstance(archive.obj, dict) else {}
    metadata: dict[str, Any] = {}
    if any(not isinstance(v, TensorRef) for v in top.values()):
        # A training state (Lightning, HF optimizer.pt...), not a plain state dict: its keys and scalars
        # (epoch, global_step, versions) are what an operator looks for.
        metadata["top_level_keys"] = [str(k) for k in top]
        metadata.update({str(k): v for k, v in top.items() if isinstance(v, (int, float, str, bool))})
    defects = tuple(archive.check_members()) if verify else ()
    return Inspection(
        url,
        Format.TORCH.value,
        (FileFact(source.rel, source.size, "weights"),),
        tensor_infos(archive, source.rel),
        metadata=metadata,
        defects=defects,
        verified=verify,
    )


def _inspect_legacy_with_torch(source: FileSource) -> Inspection:
    """The pre-zip torch format has no directory to read: only torch can list it, and only safely with
    ``weights_only=True`` passed explicitly (an environment variable can flip the default)."""
    import importlib.util

    url = source.location.url_of(source.rel)
    try:
        has_torch = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        has_torch = False
    if not has_torch or not source.location.is_local:
        raise LegacyTorchFormat(
            f"{source.name}: torch's legacy (non-zip) format: listing it needs torch"
            + ("" if source.location.is_local else " and a local copy"),
            url=url,
            hint="install torch (pip install torch) and inspect a local copy; ckptctl then uses "
            "torch.load(weights_only=True)",
        )
    import torch

    try:
        obj = torch.load(source.location.full_path(source.rel), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types; the message is what the user needs
        raise IntegrityError(
            f"{source.name}: torch.load(weights_only=True) refused it: {exc}".splitlines()[0], url=url
        ) from None
    tensors = []

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            tensors.append(
                TensorInfo(".".join(path), dtype, tuple(value.shape), value.numel() * value.element_size())
            )
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, str(k)))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, (*path, str(i)))

    walk(obj, ())
    return Inspection(
        url,
        Format.TORCH.value,
        (FileFact(source.rel, source.size, "weights"),),
        tuple(tensors),
        notes=("legacy (non-zip) torch format: read with torch.load(weights_only=True)",),
    )


def inspect_sharded(
    location: Location,
    index_entry: FileEntry,
    listing: dict[str, FileEntry] | None = None,
    *,
    verify: bool = False,
) -> Inspection:
    """An HF sharded checkpoint: the index (a file of ``location``) names each tensor's shard; every shard's
    header is read and must list exactly the names the index maps to it. ``listing``: the folder's files when
    the caller has listed it already (else one listing)."""
    try:
        index = json.loads(location.read_bytes(index_entry.path))
        weight_map = {str(k): str(v) for k, v in index["weight_map"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(
            f"{index_entry.path}: not a safetensors index ({type(exc).__name__}: {exc})",
            url=location.url_of(index_entry.path),
        ) from None
    if listing is None:
        listing = {e.path: e for e in location.walk() if e.type == "file"}
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, set()).add(name)
    tensors: list[TensorInfo] = []
    defects: list[Defect] = []
    files = [FileFact(index_entry.path, index_entry.size, "index")]
    for rel in sorted(shards):
        entry = listing.get(rel)
        if entry is None:
            defects.append(Defect(rel, "shard named in the index is missing"))
            continue
        files.append(FileFact(rel, entry.size, "weights"))
        try:
            header = read_safetensors_header(FileSource(location, rel, entry.size))
        except IntegrityError as exc:
            defects.append(Defect(rel, exc.message.split(": ", 1)[-1]))
            continue
        defects += header.defects
        names = {t.name for t in header.tensors}
        for name in sorted(shards[rel] - names):
            defects.append(Defect(rel, f"index maps {name!r} here, the shard does not hold it"))
        for name in sorted(names - shards[rel]):
            defects.append(Defect(rel, f"holds {name!r}, which the index does not map here"))
        tensors += [_with_file(t, rel) for t in header.tensors]
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    notes = []
    declared = metadata.get("total_size") if metadata else None
    actual = sum(t.nbytes for t in tensors)
    if isinstance(declared, int) and declared != actual and not defects:
        notes.append(f"index total_size {declared} differs from the shards' tensor bytes {actual}")
    return Inspection(
        location.url_of(index_entry.path),
        Format.SAFETENSORS_SHARDED.value,
        tuple(files),
        tuple(tensors),
        metadata=dict(metadata),
        facts={"shards": len(shards)},
        defects=tuple(defects),
        notes=tuple(notes),
        verified=verify,
    )


def inspect_peft(location: Location, files: dict[str, FileEntry], *, verify: bool = False) -> Inspection:
    config = read_adapter_config(location)
    weights = next((n for n in ADAPTER_WEIGHTS if n in files), None)
    facts_files = [FileFact(ADAPTER_CONFIG, files[ADAPTER_CONFIG].size, "config")]
    defects: list[Defect] = []
    tensors: tuple[TensorInfo, ...] = ()
    metadata: dict[str, Any] = {}
    if weights is None:
        defects.append(Defect(ADAPTER_WEIGHTS[0], "adapter weights missing"))
    else:
        weights_result = inspect_file(location, files[weights], verify=verify)
        tensors, metadata = weights_result.tensors, weights_result.metadata
        defects += weights_result.defects
        facts_files += weights_result.files
    facts, peft_defects = peft_facts(config, tensors, weights or ADAPTER_WEIGHTS[0])
    defects += peft_defects
    return Inspection(
        location.url,
        Format.PEFT.value,
        tuple(facts_files),
        tensors,
        metadata=metadata,
        facts={"peft": facts},
        defects=tuple(defects),
        verified=verify,
    )
