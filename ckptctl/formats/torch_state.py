"""Which tensors of a torch state-dict file (``torch.save`` of nested dicts, names joined with ``.``) are the model.

A Lightning ``.ckpt`` keeps the LightningModule's weights under ``state_dict`` beside ``optimizer_states``,
``lr_schedulers``, ``callbacks`` and ``loops``; a hand-written training loop often saves
``{"model": ..., "optimizer": ..., "epoch": ...}``. Plain ``model.state_dict()`` files (``pytorch_model.bin``,
``model.pt``) are all model. Decided from the tensor names alone, so it costs nothing beyond the listing.

Each tensor is byte ranges of its file (one when contiguous: torch_file.py); only headers and (restricted)
pickles are read to find them. Torch files of either serialization are read: the zip archive and the legacy
format of torch < 1.6, which older tooling still writes as ``pytorch_model*.bin``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ckptctl.errors import IntegrityError, NotFoundError, TruncatedError
from ckptctl.formats.dcp import NON_MODEL_ROOTS
from ckptctl.formats.deepspeed import looks_like_deepspeed
from ckptctl.formats.model import Defect
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import FileSource
from ckptctl.formats.tensor_layout import Range, TensorPlan, TensorSource
from ckptctl.formats.torch_file import PieceBudget, TorchFile, tensor_sources
from ckptctl.formats.torch_legacy import is_legacy_head, read_legacy_torch
from ckptctl.formats.torch_zip import read_torch_archive
from ckptctl.storage.location import Location

LIGHTNING_STATE = "state_dict"
MODEL_WRAPPERS = ("model", "model_state_dict")
# Roots of training state that may sit beside a model wrapper (torch's tutorials save "model_state_dict" and
# "optimizer_state_dict"; Lightning "optimizer_states" and "lr_schedulers").
TRAINING_STATE_ROOTS = NON_MODEL_ROOTS | {
    "optimizer_state_dict",
    "optimizer_states",
    "lr_schedulers",
    "scheduler",
    "scaler",
    "ema",
}


def model_subtree(names: Iterable[str]) -> str | None:
    """The sub-tree that holds the model weights, or None when every tensor is the model's.

    ``state_dict`` when there is one (Lightning); a wrapper (``model``, ``model_state_dict``) only when training
    state (``optimizer``…) or nothing else sits beside it. A bare ``model.`` beside other model roots is a
    model's own sub-module (HF ``LlamaForCausalLM``: ``model.layers…`` and ``lm_head``).
    """
    roots = {name.split(".", 1)[0] for name in names}
    if LIGHTNING_STATE in roots:
        return LIGHTNING_STATE
    for wrapper in MODEL_WRAPPERS:
        if wrapper in roots and roots - {wrapper} <= TRAINING_STATE_ROOTS and roots != {"model"}:
            return wrapper
    return None


STATE_DICT_FILES = (
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "model.safetensors",
)


def refuse_defects(location: Location, rel: str, defects: list[Defect] | tuple[Defect, ...]) -> None:
    """A file whose own structure proves it cut or damaged is refused whole, even when the tensors wanted lie
    outside the damage: a conversion never turns a corrupt checkpoint into a clean-looking output."""
    if not defects:
        return
    url = location.url_of(rel)
    error = TruncatedError if any(d.truncated for d in defects) else IntegrityError
    more = f" (and {len(defects) - 1} more)" if len(defects) > 1 else ""
    raise error(
        f"{url}: {defects[0].message}{more}",
        url=url,
        hint=f"ckptctl inspect --verify {url} lists every defect",
    )


def _safetensors(location: Location, rel: str, size: int) -> dict[str, TensorSource]:
    header = read_safetensors_header(FileSource(location, rel, size))
    refuse_defects(location, rel, header.defects)
    return {
        t.name: TensorSource(location, t.name, t.dtype, t.shape, (Range(rel, *header.spans[t.name]),))
        for t in header.tensors
    }


def _torch(
    location: Location, rel: str, size: int, legacy: bool, budget: PieceBudget | None
) -> dict[str, TensorSource]:
    """A torch file's tensors, after every structural check that needs no tensor data (storages inside the file,
    views inside their storages; for a legacy file also every storage's own element count, one small read per
    run of storages): a conversion never streams bytes the file's own structure contradicts."""
    source = FileSource(location, rel, size)
    file: TorchFile
    if legacy:
        file = read_legacy_torch(source)
        refuse_defects(location, rel, file.check("all"))
    else:
        file = read_torch_archive(source)
        refuse_defects(location, rel, file.check_members())
    return tensor_sources(file, budget)


def open_file(
    location: Location, rel: str, size: int, budget: PieceBudget | None = None
) -> dict[str, TensorSource]:
    """A state dict file by its content: safetensors, or a torch file (``.pt``, ``.bin``, ``.pth``) as a zip
    archive or in the legacy format. ``budget`` bounds the pieces of non-contiguous tensors across the files of
    one state dict."""
    head = location.read_range(rel, 0, 32)
    if head.startswith(b"PK") or is_legacy_head(head):
        return _torch(location, rel, size, is_legacy_head(head), budget)
    return _safetensors(location, rel, size)


def _weight_map(location: Location, index_name: str) -> dict[str, str]:
    """An HF shard index's ``weight_map`` (tensor -> shard file in this folder); IntegrityError when it is not
    JSON of that shape."""
    try:
        weight_map = json.loads(location.read_bytes(index_name)).get("weight_map")
    except (ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for k, v in weight_map.items()
    ):
        raise IntegrityError(
            f"{location.url_of(index_name)}: not a shard index (no weight_map of file names)"
        )
    return weight_map


WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.pt",
    "full_state_dict.safetensors",
    "full_state_dict.pt",
)


def open_weights(location: Location) -> tuple[dict[str, TensorSource], str] | None:
    """A torch state dict as tensor sources: one file (safetensors or a torch archive), or a folder of HF
    weights (a shard index, one weights file, or the only ``.safetensors``/``.pt`` file at its top); returns the
    tensors and a description of what was opened, or None when the folder holds no such file."""
    entry = location.stat()
    if entry.type == "file":
        return open_file(location.parent(), location.name, entry.size), location.url
    entries = location.walk()
    files = {e.path: e for e in entries if e.type == "file"}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in files:
            weight_map = _weight_map(location, index_name)
            found: dict[str, TensorSource] = {}
            budget = PieceBudget()
            for shard in sorted(set(weight_map.values())):
                if shard not in files:
                    raise NotFoundError(f"{location.url_of(index_name)} names {shard}, which is missing")
                found.update(open_file(location, shard, files[shard].size, budget))
            absent = next((n for n, shard in weight_map.items() if n not in found), None)
            if absent is not None:
                raise IntegrityError(
                    f"{location.url_of(index_name)}: tensor {absent!r} is not in {weight_map[absent]}",
                    url=location.url_of(weight_map[absent]),
                )
            return found, location.url_of(index_name)
    for name in WEIGHT_FILES:
        if name in files:
            return open_file(location, name, files[name].size), location.url_of(name)
    if looks_like_deepspeed(entries):
        return None  # a DeepSpeed save's .pt files are rank files, not a state dict
    candidates = sorted(
        p for p in files if "/" not in p and p.endswith((".safetensors", ".pt", ".bin", ".pth"))
    )
    if len(candidates) == 1:
        return open_file(location, candidates[0], files[candidates[0]].size), location.url_of(candidates[0])
    return None


def plan_state_dict(sources: dict[str, TensorSource], what: str) -> TensorPlan:
    """The model weights of a state dict (``open_weights``): only the model sub-tree is kept
    (``model_subtree``); a name viewing the same bytes as an earlier one (tied weights) becomes an alias, as for
    ZeRO."""
    subtree = model_subtree(sources)
    cut = len(subtree) + 1 if subtree else 0
    plan = TensorPlan(what.rsplit("/", 1)[-1], "torch", [])
    seen: dict[tuple[Any, ...], str] = {}
    for name, source in sources.items():
        if subtree and not name.startswith(subtree + "."):
            plan.dropped += 1
            continue
        new = name[cut:]
        view = (source.location.url, source.ranges, source.chunks, source.dtype, source.shape)
        if view in seen and source.nbytes:
            plan.aliases[new] = seen[view]
            continue
        seen[view] = new
        plan.tensors.append(replace(source, name=new))
    if subtree:
        plan.warnings.append(f"wrote the {subtree!r} sub-tree; {plan.dropped} other tensor(s) left out")
    return plan
