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
from ckptctl.formats.dcp_hf import inspect_dcp_hf, rank_piece_note, shard_folder
from ckptctl.formats.deepspeed import inspect_deepspeed
from ckptctl.formats.detect import Format, format_of_bytes, format_of_dir, format_of_name
from ckptctl.formats.lightning import checkpoint_callback, lightning_meta
from ckptctl.formats.model import Defect, FileFact, Inspection, TensorInfo
from ckptctl.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_facts, read_adapter_config
from ckptctl.formats.plain_pickle import is_pickle_head, read_pickle_file
from ckptctl.formats.restricted_pickle import TensorRef
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_file import TorchFile, read_torch_file
from ckptctl.formats.torch_legacy import LegacyTorchFile, is_legacy_head
from ckptctl.formats.training_state import tensor_infos, training_state_facts
from ckptctl.formats.verify import check_file
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
        return inspect_file(
            location.parent(), FileEntry(location.name, "file", entry.size, entry.mtime), verify=verify
        )
    entries = location.walk()
    files = [e for e in entries if e.type == "file"]
    # Before format_of_dir: the HF writer's step folder holds a plain-looking shard index beside sharded/.
    shards = shard_folder(e.path for e in files)
    if shards is not None:
        result = inspect_dcp_hf(location, entries, shards, verify=verify)
        return _verify_other_files(location, files, result) if verify else result
    found = format_of_dir(e.path for e in files)
    if found is None:
        # What is at the top, folders included: a folder holding only sub-folders is not empty.
        top = sorted({e.path.split("/", 1)[0] + ("/" if "/" in e.path else "") for e in files})
        names = ", ".join(top[:5]) + (f" and {len(top) - 5} more" if len(top) > 5 else "") or "it is empty"
        raise NothingRecognisedError(
            f"{location.url}: no checkpoint recognised in this folder ({names})",
            url=location.url,
            hint="inspect takes a checkpoint file or folder (safetensors, torch, DeepSpeed, DCP, PEFT); "
            "for a run, add --step N or --latest",
        )
    result = _inspect_folder(location, entries, files, found, verify=verify)
    return _verify_other_files(location, files, result) if verify else result


def _inspect_folder(
    location: Location,
    entries: list[FileEntry],
    files: list[FileEntry],
    found: tuple[Format, str | None],
    *,
    verify: bool,
) -> Inspection:
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


def _verify_other_files(location: Location, files: list[FileEntry], result: Inspection) -> Inspection:
    """``--verify`` on a folder: every other file of the checkpoint with a checkable format (formats/verify.py)
    — the unit's top level and the folders its main reader read (a DeepSpeed tag), not other tags — each
    defect naming its file."""
    checked_by_reader = {f.path for f in result.files if f.role != "other"}
    folders = {posixpath.dirname(p) for p in checked_by_reader} | {""}
    defects = list(result.defects)
    kinds: dict[str, str] = {}
    unchecked: list[str] = []
    for entry in files:
        if entry.path in checked_by_reader or entry.parent not in folders:
            continue
        check = check_file(location, entry)
        if check.kind is None:
            unchecked.append(entry.path)
            continue
        kinds[entry.path] = check.kind
        defects += check.defects
    facts = dict(result.facts)
    facts["verified_files"] = {"checked": kinds, "not_checkable": unchecked}
    return replace(result, defects=tuple(defects), facts=facts)


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
        piece = rank_piece_note(entry.name, header.metadata)
        return Inspection(
            url,
            kind.value,
            (FileFact(entry.path, entry.size, "weights"),),
            tensors,
            metadata=dict(header.metadata),
            defects=header.defects,
            notes=(piece,) if piece else (),
            verified=verify,
        )
    if kind is Format.SAFETENSORS_SHARDED:
        return inspect_sharded(location, entry, verify=verify)
    if kind is Format.DCP:
        parent = location
        return inspect_dcp(parent, parent.walk(), verify=verify)
    if kind is Format.PICKLE:
        return inspect_pickle_file(source, verify=verify)
    return inspect_torch_file(source, verify=verify)


def _with_file(tensor: TensorInfo, file: str) -> TensorInfo:
    return replace(tensor, file=file)


def inspect_torch_file(source: FileSource, *, verify: bool = False) -> Inspection:
    """A torch.save file of either serialization (or, failing both, a plain pickle), torch-free.

    Always: the zip directory and ``data.pkl``, or the legacy pickles and the storages' sizes against the file
    size (that is the legacy format's truncation check). ``verify`` adds every zip member's size, or every
    legacy storage's element count.
    """
    try:
        torch_file = read_torch_file(source)
    except IntegrityError:
        head = source.head()
        if is_pickle_head(head) and not is_legacy_head(head):
            return inspect_pickle_file(source, verify=verify)
        raise
    notes: list[str] = []
    facts: dict[str, Any] = {}
    if isinstance(torch_file, LegacyTorchFile):
        defects = torch_file.check("all" if verify else "cached")
        facts["torch"] = {"serialization": "legacy", "storages": len(torch_file.storages)}
        if torch_file.unknown is not None:
            notes.append(f"the data section's size cannot be checked: {torch_file.unknown}")
        if torch_file.trailing_bytes:
            notes.append(
                f"{torch_file.trailing_bytes} bytes after the last storage (torch.load ignores them)"
            )
    else:
        defects = torch_file.check_members() if verify else []
        storages = {r.storage_key for r in torch_file.tensors}
        facts["torch"] = {"serialization": "zip", "storages": len(storages)}
    tensors = tensor_infos(torch_file.obj, torch_file.tensors, torch_file.aliases, source.rel)
    facts.update(training_state_facts(torch_file.obj, tensors))
    lightning = _lightning_facts(torch_file)
    if lightning:
        facts["lightning"] = lightning
    return Inspection(
        source.location.url_of(source.rel),
        Format.TORCH.value,
        (FileFact(source.rel, source.size, "weights"),),
        tensors,
        metadata=_top_level(torch_file.obj),
        facts=facts,
        defects=tuple(defects),
        notes=tuple(notes),
        verified=verify,
    )


def _top_level(obj: Any) -> dict[str, Any]:
    """A training state (Lightning, HF optimizer.pt...), not a plain state dict: its keys and scalars (epoch,
    global_step, versions) are what an operator looks for."""
    top = obj if isinstance(obj, dict) else {}
    if all(isinstance(v, TensorRef) for v in top.values()):
        return {}
    metadata: dict[str, Any] = {"top_level_keys": [str(k) for k in top]}
    metadata.update({str(k): v for k, v in top.items() if isinstance(v, (int, float, str, bool))})
    return metadata


def _lightning_facts(torch_file: TorchFile) -> dict[str, Any]:
    """What a Lightning checkpoint's ModelCheckpoint state says (formats/lightning.py; one more read)."""
    if checkpoint_callback(torch_file.obj) is None:
        return {}
    meta = lightning_meta(torch_file.obj, torch_file)
    return {
        "monitor": meta.monitor,
        "mode": meta.mode,
        "current_score": meta.current_score,
        "best_k_models": meta.best_k_models,
        "best_model_path": meta.best_model_path,
        "last_model_path": meta.last_model_path,
    }


def inspect_pickle_file(source: FileSource, *, verify: bool = False) -> Inspection:
    """A plain pickle (``pickle.dump``: not torch.save), e.g. some trainers' RNG state: what it holds, from
    the allow-listed records; cut before its STOP opcode it is an IntegrityError."""
    pickled = read_pickle_file(source)
    notes = []
    if pickled.end < source.size:
        notes.append(f"{source.size - pickled.end} bytes after the pickle's end")
    return Inspection(
        source.location.url_of(source.rel),
        Format.PICKLE.value,
        (FileFact(source.rel, source.size, "state"),),
        (),
        metadata=_top_level(pickled.obj),
        facts=training_state_facts(pickled.obj, ()),
        notes=tuple(notes),
        verified=verify,
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
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise IntegrityError(
            f"{index_entry.path}: not a safetensors index ({type(exc).__name__}: {str(exc)[:200]})",
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
