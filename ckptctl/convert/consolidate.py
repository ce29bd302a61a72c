"""DeepSpeed ZeRO shards -> one safetensors file, as DeepSpeed's ``zero_to_fp32`` builds it, without DeepSpeed or
torch, reading only the fp32 master ranges (never the Adam moments) and writing each tensor as it is assembled.

The format and ``zero_to_fp32``'s algorithm are in ``shared/fixtures/zero/README.md``. Output order as
``zero_to_fp32``: persistent buffers, frozen parameters, trainable parameters (tied aliases are recorded in the
header's ``__metadata__`` instead of being written twice, unless ``keep_tied``).
"""

from __future__ import annotations

import contextlib
import json
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ckptctl.convert.safetensors_writer import PlannedTensor, SafetensorsStream
from ckptctl.convert.selection import Selection
from ckptctl.convert.tensor_sources import (
    TensorSource,
    assemble_chunks,
    looks_like_deepspeed,
    open_state_dict,
)
from ckptctl.errors import IntegrityError, NotFoundError, RefusedError, UsageError
from ckptctl.formats.dcp import METADATA as DCP_METADATA
from ckptctl.formats.dcp import find_dcp_folder, locate_chunks, model_names, read_dcp_checkpoint
from ckptctl.formats.deepspeed import partition_problems, world_sizes
from ckptctl.formats.source import FileSource
from ckptctl.formats.tensor_layout import Chunk, Range, is_contiguous
from ckptctl.formats.torch_state import model_subtree
from ckptctl.formats.torch_zip import TensorRecord, TorchArchive, read_torch_archive
from ckptctl.storage.atomic import atomic_local_file
from ckptctl.storage.location import FileEntry, Location, is_url, refuse_overlap

_OPTIM = re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")
_MODEL_Z3 = re.compile(r"^zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_model_states\.pt$")
_FLOATS = {"float32", "float16", "bfloat16", "float64"}
OUTPUT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: str
    """The dtype of the bytes in the pieces."""
    shape: tuple[int, ...]
    pieces: tuple[Range, ...]
    """Concatenated, then cut to the tensor's size (ZeRO-3 partitions are padded)."""
    chunks: tuple[Chunk, ...] = ()
    """Instead of ``pieces``: blocks of the global tensor that tile it (DCP)."""
    location: Location | None = None
    """Where the files of ``pieces`` are, when not SRC itself (SRC is one file)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ConsolidationPlan:
    tag: str
    stage: int | None
    """ZeRO only."""
    world_size: int | None
    tensors: list[SourceTensor]
    aliases: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    format: str = "zero"
    dropped: int = 0
    """Tensors of the checkpoint that are not model weights (optimizer state, train state), left out."""
    non_tensors: list[str] = field(default_factory=list)
    """Non-tensor items of the model sub-tree (DCP bytes items), listed and left out, never unpickled."""


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_tag(location: Location, entries: Sequence[FileEntry], tag: str | None) -> str:
    """The tag folder (relative to ``location``): ``tag``, or the one ``latest`` names, or ``location`` itself."""
    names = {e.path for e in entries if e.type == "file"}
    if tag is not None:
        if not any(n.startswith(f"{tag}/") for n in names):
            raise NotFoundError(f"no tag {tag!r} in {location.url}", url=location.url)
        return tag
    if any("/" not in n and n.endswith("model_states.pt") for n in names):
        return ""
    if "latest" in names:
        named = location.read_bytes("latest").decode(errors="replace").strip()
        if not any(n.startswith(f"{named}/") for n in names):
            raise IntegrityError(
                f"{location.url_of('latest')} names tag {named!r}, which is not in {location.url}",
                url=location.url,
            )
        return named
    tags = sorted({n.split("/", 1)[0] for n in names if "/" in n and n.endswith("model_states.pt")})
    if len(tags) == 1:
        return tags[0]
    raise NotFoundError(
        f"{location.url} is not a DeepSpeed checkpoint (no *_model_states.pt, no latest)"
        if not tags
        else f"{location.url} has several tags ({', '.join(tags)}) and no latest file",
        url=location.url,
        hint=None if not tags else "pass --tag",
    )


def _archive(location: Location, rel: str, sizes: dict[str, int]) -> TorchArchive:
    return read_torch_archive(FileSource(location, rel, sizes[rel]))


def _records(archive: TorchArchive) -> dict[tuple[Any, ...], TensorRecord]:
    return {record.path: record for record in archive.tensors}


def _range(archive: TorchArchive, record: TensorRecord, first: int, count: int) -> Range:
    """Elements [first, first + count) of a contiguous tensor, as a byte range of its file."""
    if not is_contiguous(record.shape, record.stride):
        raise IntegrityError(f"{archive.source.name}: tensor {record.name} is not contiguous")
    start = archive.tensor_byte_offset(record) + first * record.itemsize
    return Range(archive.source.rel, start, start + count * record.itemsize)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value)


def plan_consolidation(
    location: Location, *, tag: str | None = None, exclude_frozen: bool = False
) -> ConsolidationPlan:
    """Find every tensor's bytes in the shards, reading only headers and pickles (no tensor data)."""
    entries = location.walk()
    tag_rel = find_tag(location, entries, tag)
    prefix = f"{tag_rel}/" if tag_rel else ""
    sizes = {e.path: e.size for e in entries if e.type == "file"}
    here = sorted(
        (p[len(prefix) :] for p in sizes if p.startswith(prefix) and "/" not in p[len(prefix) :]),
        key=_natural,
    )
    optim = [n for n in here if _OPTIM.match(n)]
    models = [n for n in here if n.endswith("model_states.pt")]
    if not models:
        raise NotFoundError(
            f"{location.url_of(tag_rel)} is not a DeepSpeed checkpoint tag (no *_model_states.pt)"
        )
    if not optim:
        raise IntegrityError(f"{location.url_of(tag_rel)}: no ZeRO optimizer files (*_optim_states.pt)")
    model0 = _archive(location, prefix + models[0], sizes)
    state = model0.obj if isinstance(model0.obj, dict) else {}
    dp, mp, implausible = world_sizes(state, 3 if any(_MODEL_Z3.match(n) for n in models) else 2, len(here))
    if "dp_world_size" in state and implausible is not None:
        # Counts from inside the file are bounded by the files there are, before any name is built from them.
        raise IntegrityError(f"{location.url_of(prefix + models[0])}: {implausible}", url=location.url)
    if mp > 1:
        raise RefusedError(
            f"{location.url_of(tag_rel)} is a tensor-parallel save (mp_world_size={mp}); consolidate merges ZeRO "
            "data-parallel shards only, and merging mp rank 0 alone would write a fraction of the model",
            url=location.url,
            hint="merge the tensor-parallel ranks with the trainer's own tools first (Megatron/DeepSpeed)",
        )
    world = dp if "dp_world_size" in state else len(optim)
    ranks = sorted(int(_OPTIM.match(n).group("dp")) for n in optim)  # type: ignore[union-attr]
    bf16 = optim[0].startswith("bf16_")
    expected = [f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    missing = [name for name in expected if name not in here]
    if missing:
        raise IntegrityError(
            f"{location.url_of(tag_rel)}: missing rank file(s) {', '.join(missing)} "
            f"(expected world size {world}, found ranks {ranks})",
            url=location.url,
        )
    if len(ranks) != world:
        raise IntegrityError(
            f"{location.url_of(tag_rel)}: optimizer files for ranks {ranks}, but the model states say world size "
            f"{world}: files from two saves are mixed",
            url=location.url,
        )
    optims = [_archive(location, prefix + name, sizes) for name in expected]
    osd = [a.obj.get("optimizer_state_dict", {}) if isinstance(a.obj, dict) else {} for a in optims]
    stage3 = "fp32_flat_groups" in osd[0]
    mismatched = partition_problems(
        3 if stage3 else 2,
        world,
        list(state.get("param_shapes") or []),
        dict(zip(expected, osd, strict=True)),
    )
    if mismatched:
        # Another model's (or another save's) optimizer files: assembling would write wrong weights.
        raise IntegrityError(f"{location.url_of(tag_rel)}: {mismatched[0]}", url=location.url)
    partition = osd[0].get("partition_count")
    count = max(partition) if isinstance(partition, list) else int(partition or world)
    if count != world:
        raise IntegrityError(
            f"{location.url_of(tag_rel)}: optimizer files were written by {count} ranks, the model states say {world}"
        )
    param_shapes = [{k: _shape(v) for k, v in group.items()} for group in state.get("param_shapes") or []]
    plan = ConsolidationPlan(tag_rel or posixpath.basename(location.root), 3 if stage3 else 2, world, [], {})
    module = state.get("module") or {}
    model_records = _records(model0)
    # 1. persistent buffers, full tensors in the model states
    for name in state.get("buffer_names") or []:
        record = model_records.get(("module", name))
        if record is None:
            continue
        plan.tensors.append(
            SourceTensor(name, record.dtype, record.shape, (_range(model0, record, 0, record.numel),))
        )
    # 2. frozen parameters
    frozen_shapes = state.get("frozen_param_shapes")
    if frozen_shapes is None:
        trainable = {n for g in param_shapes for n in g}
        known = trainable | set(state.get("buffer_names") or []) | set(state.get("shared_params") or {})
        dropped = [n for n in module if n not in known]
        if dropped and not exclude_frozen:
            plan.warnings.append(
                f"this checkpoint does not store frozen parameters (ZeRO stage 1, or saved with "
                f"exclude_frozen_parameters): {len(dropped)} are not in the output ({', '.join(dropped[:3])}...)"
            )
    elif not exclude_frozen:
        plan.tensors += _frozen(
            location,
            prefix,
            here,
            sizes,
            model0,
            {k: _shape(v) for k, v in frozen_shapes.items()},
            world,
            stage3,
        )
    # 3. trainable parameters from the fp32 masters
    if stage3:
        plan.tensors += _stage3(optims, param_shapes, world)
    else:
        plan.tensors += _stage12(optims, osd, param_shapes)
    plan.aliases = {str(k): str(v) for k, v in (state.get("shared_params") or {}).items()}
    config = state.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    if isinstance(zero, dict) and isinstance(zero.get("stage"), int):
        plan.stage = zero["stage"]
    return plan


def _frozen(
    location: Location,
    prefix: str,
    here: list[str],
    sizes: dict[str, int],
    model0: TorchArchive,
    shapes: dict[str, tuple[int, ...]],
    world: int,
    stage3: bool,
) -> list[SourceTensor]:
    if not stage3:
        records = _records(model0)
        out = []
        for name, shape in shapes.items():
            record = records[("frozen_param_fragments", name)]
            out.append(SourceTensor(name, record.dtype, shape, (_range(model0, record, 0, record.numel),)))
        return out
    models = sorted((n for n in here if _MODEL_Z3.match(n)), key=_natural)
    if len(models) != world:
        raise IntegrityError(f"expected {world} ZeRO-3 model state files, found {len(models)}")
    archives = [
        model0 if prefix + n == model0.source.rel else _archive(location, prefix + n, sizes) for n in models
    ]
    by_rank = [_records(a) for a in archives]
    out = []
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        pieces = []
        for archive, records in zip(archives, by_rank, strict=True):
            record = records[("frozen_param_fragments", name)]
            pieces.append(_range(archive, record, 0, min(part, record.numel)))
        out.append(
            SourceTensor(name, by_rank[0][("frozen_param_fragments", name)].dtype, shape, tuple(pieces))
        )
    return out


def _stage12(
    optims: list[TorchArchive], osd: list[dict[str, Any]], param_shapes: list[dict[str, tuple[int, ...]]]
) -> list[SourceTensor]:
    out = []
    for g, shapes in enumerate(param_shapes):
        parts = []
        for archive in optims:
            record = _records(archive)[("optimizer_state_dict", "single_partition_of_fp32_groups", g)]
            parts.append((archive, record))
        paddings = osd[0].get("param_alignment_paddings")
        pads = paddings[g] if isinstance(paddings, list) and g < len(paddings) else [0] * len(shapes)
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            out.append(SourceTensor(name, "float32", shape, tuple(_span(parts, offset, numel))))
            offset += numel + (pads[i] if i < len(pads) else 0)
    return out


def _span(parts: list[tuple[TorchArchive, TensorRecord]], first: int, count: int) -> list[Range]:
    """Elements [first, first + count) of the concatenation of the ranks' partitions."""
    pieces, start = [], 0
    for archive, record in parts:
        end = start + record.numel
        lo, hi = max(first, start), min(first + count, end)
        if lo < hi:
            pieces.append(_range(archive, record, lo - start, hi - lo))
        start = end
    if sum(p.end - p.start for p in pieces) != count * 4:
        raise IntegrityError(
            f"the fp32 partitions hold fewer elements than the parameter shapes need ({first + count})"
        )
    return pieces


def _stage3(
    optims: list[TorchArchive], param_shapes: list[dict[str, tuple[int, ...]]], world: int
) -> list[SourceTensor]:
    out = []
    for s, shapes in enumerate(param_shapes):
        flats = [(a, _records(a)[("optimizer_state_dict", "fp32_flat_groups", s)]) for a in optims]
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [_range(archive, record, offset, part) for archive, record in flats]
            out.append(SourceTensor(name, "float32", shape, tuple(pieces)))
            offset += part
    return out


STATE_DICT_FILES = (
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "model.safetensors",
)


def plan_source(
    location: Location, *, tag: str | None = None, exclude_frozen: bool = False
) -> ConsolidationPlan:
    """The plan for whatever checkpoint ``location`` is: a DCP folder (or a run folder holding one), one torch
    state-dict file (``.pt``/``.bin``/Lightning ``.ckpt``, or a safetensors file), an HF weights folder (single
    or sharded ``pytorch_model*.bin`` / ``model*.safetensors``), else a DeepSpeed ZeRO save."""
    if location.stat().type == "file":
        return _plan_state_dict(location)
    entries = location.walk()
    folder = find_dcp_folder(entries, tag)
    if folder is not None:
        return _plan_dcp(location, folder)
    top = {e.path for e in entries if e.type == "file" and "/" not in e.path}
    if tag is None and not looks_like_deepspeed(entries):
        if top & set(STATE_DICT_FILES):
            return _plan_state_dict(location)
        names = sorted({e.path.split("/", 1)[0] for e in entries})
        found = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "") or "nothing"
        raise NotFoundError(
            f"{location.url} is not a DeepSpeed checkpoint (no *_model_states.pt, no latest), a DCP folder (no "
            f".metadata) or an HF weights folder (no {STATE_DICT_FILES[0]}, {STATE_DICT_FILES[2]}); it holds {found}",
            url=location.url,
        )
    return plan_consolidation(location, tag=tag, exclude_frozen=exclude_frozen)


def _plan_state_dict(location: Location) -> ConsolidationPlan:
    """A torch state dict (names joined with ``.``) read through tensor_sources: each tensor one byte range.
    Only the model sub-tree is kept (formats/torch_state.py); a name viewing the same bytes as an earlier one
    (tied weights) becomes an alias, as for ZeRO."""
    sources, what = open_state_dict(location)
    subtree = model_subtree(sources)
    cut = len(subtree) + 1 if subtree else 0
    plan = ConsolidationPlan(what.rsplit("/", 1)[-1], None, None, [], {}, format="torch")
    seen: dict[tuple[Any, ...], str] = {}
    for name, source in sources.items():
        if subtree and not name.startswith(subtree + "."):
            plan.dropped += 1
            continue
        new = name[cut:]
        view = (source.location.url, source.ranges, source.dtype, source.shape)
        if view in seen and source.nbytes:
            plan.aliases[new] = seen[view]
            continue
        seen[view] = new
        plan.tensors.append(
            SourceTensor(new, source.dtype, source.shape, source.ranges, location=source.location)
        )
    if subtree:
        plan.warnings.append(f"wrote the {subtree!r} sub-tree; {plan.dropped} other tensor(s) left out")
    return plan


def _plan_dcp(location: Location, folder: str) -> ConsolidationPlan:
    """The model weights of the DCP checkpoint in ``folder`` of ``location`` (formats/dcp.py ``model_names``),
    each tensor's chunks located in the data files before anything is written: a damaged item fails the plan,
    not a half-written output. Byte ranges are relative to ``location``, as the writer reads them."""
    checkpoint = read_dcp_checkpoint(location.child(folder) if folder else location)
    names = model_names([(t.fqn, t.path) for t in checkpoint.tensors] + list(checkpoint.bytes_items))
    base = f"{folder}/" if folder else ""
    model = [t for t in checkpoint.tensors if t.fqn in names]
    located = locate_chunks(checkpoint, model)
    tensors = [
        SourceTensor(
            names[t.fqn],
            t.dtype,
            t.shape,
            (),
            tuple(replace(c, range=replace(c.range, rel=base + c.range.rel)) for c in located[t.fqn]),
        )
        for t in model
    ]
    plan = ConsolidationPlan(
        folder or posixpath.basename(location.root),
        None,
        None,
        tensors,
        {},
        format="dcp",
        dropped=len(checkpoint.tensors) - len(tensors),
        non_tensors=[names[n] for n, _ in checkpoint.bytes_items if n in names],
    )
    if checkpoint.metadata_files[0] != DCP_METADATA:
        plan.warnings.append(
            f"saved with use_collectives=False: merged {len(checkpoint.metadata_files)} per-rank metadata files"
        )
    if plan.non_tensors:
        shown = ", ".join(plan.non_tensors[:5]) + ("..." if len(plan.non_tensors) > 5 else "")
        plan.warnings.append(
            f"{len(plan.non_tensors)} non-tensor item(s) left out (never unpickled): {shown}"
        )
    return plan


def _to_numpy(data: bytes, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<"))


_NUMPY = {
    "float32": "f4",
    "float16": "f2",
    "float64": "f8",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}


def cast(data: bytes, source: str, target: str) -> bytes:
    """Convert raw little-endian bytes between dtypes; float -> bf16 rounds to nearest even like torch."""
    if source == target:
        return data
    values = _to_numpy(data, source).astype(np.float32)
    if target == "float32":
        return values.astype("<f4").tobytes()
    if target == "float16":
        return values.astype("<f2").tobytes()
    if target == "bfloat16":
        bits = values.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
        return rounded.astype("<u2").tobytes()
    raise UsageError(f"unsupported output dtype {target}")


@dataclass(frozen=True)
class ConsolidationResult:
    output: str
    tensors: int
    parameters: int
    bytes_written: int
    seconds: float
    stage: int | None
    world_size: int | None
    aliases: dict[str, str]
    warnings: tuple[str, ...]
    format: str = "zero"
    dropped: int = 0
    """Tensors of the checkpoint not written: not model weights, or outside --prefix/--exclude."""
    non_tensors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "format": self.format,
            "tensors": self.tensors,
            "kept": self.tensors,
            "dropped": self.dropped,
            "parameters": self.parameters,
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "zero_stage": self.stage,
            "world_size": self.world_size,
            "aliases": self.aliases,
            "non_tensors": list(self.non_tensors),
            "warnings": list(self.warnings),
        }


MODEL_CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _shards(tensors: list[PlannedTensor], max_bytes: int | None) -> list[list[int]]:
    """Indexes of ``tensors`` per output file: greedy in order, a new file when the next tensor would overflow."""
    groups: list[list[int]] = [[]]
    size = 0
    for index, tensor in enumerate(tensors):
        if max_bytes is not None and groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += tensor.nbytes
    return groups


def consolidate(
    src: Location,
    out_path: str,
    *,
    tag: str | None = None,
    dtype: str | None = None,
    exclude_frozen: bool = False,
    keep_tied: bool = False,
    force: bool = False,
    max_shard_bytes: int | None = None,
    copy_configs: bool = True,
    on_bytes: Callable[[int], None] | None = None,
    out_options: dict[str, Any] | None = None,
    selection: Selection | None = None,
) -> ConsolidationResult:
    """Write ``out_path`` (a .safetensors file or a folder, local or a URL) from the checkpoint at ``src``: a
    DeepSpeed ZeRO save (floats as fp32 unless ``dtype``, as ``zero_to_fp32``) or a DCP folder (dtypes as
    stored unless ``dtype``), its model weights narrowed by ``selection``.

    Each output file appears under its name only when complete (temp + rename); with ``max_shard_bytes`` the HF
    layout is written, shards first and ``model.safetensors.index.json`` last. ``on_bytes(n)`` reports progress.
    An OUT that is, contains or lies inside SRC is refused before anything is read or written; when writing
    fails (a full disk), every file this call wrote is removed again.
    """
    import os

    started = time.perf_counter()
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--dtype takes {', '.join(OUTPUT_DTYPES)}; got {dtype!r}")
    remote_out = is_url(out_path)
    out_location = Location.from_url(out_path, out_options if remote_out else None)
    refuse_overlap(out_location, src, output_role="OUT", source_role="SRC")
    if remote_out:
        return _consolidate_to_store(
            src,
            out_path,
            out_options or {},
            tag=tag,
            dtype=dtype,
            exclude_frozen=exclude_frozen,
            keep_tied=keep_tied,
            force=force,
            max_shard_bytes=max_shard_bytes,
            copy_configs=copy_configs,
            on_bytes=on_bytes,
            selection=selection,
        )
    if os.path.isdir(out_path) or out_path.endswith("/") or max_shard_bytes is not None:
        folder = out_path
        final = os.path.join(
            folder, "model.safetensors.index.json" if max_shard_bytes else "model.safetensors"
        )
    else:
        folder = os.path.dirname(os.path.abspath(out_path))
        final = out_path
    if os.path.exists(final) and not force:
        raise RefusedError(f"{final} exists; pass --force to replace it")
    plan = plan_source(src, tag=tag, exclude_frozen=exclude_frozen)
    target = OUTPUT_DTYPES[dtype] if dtype else ("float32" if plan.format == "zero" else None)
    names = {t.name for t in plan.tensors}
    order = list(plan.tensors)
    if keep_tied:
        by_name = {t.name: t for t in plan.tensors}
        order += [
            replace(by_name[owner], name=alias)
            for alias, owner in plan.aliases.items()
            if owner in by_name and alias not in names
        ]
    order, aliases = _select(plan, order, selection or Selection(), keep_tied)
    made_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    planned = [
        PlannedTensor(t.name, target if target and t.dtype in _FLOATS else t.dtype, t.shape) for t in order
    ]
    metadata = {"format": "pt"}
    if aliases and not keep_tied:
        metadata["tied_aliases"] = json.dumps(aliases, sort_keys=True)
    groups = _shards(planned, max_shard_bytes)
    files = (
        [final]
        if max_shard_bytes is None
        else [
            os.path.join(folder, f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
            for i in range(len(groups))
        ]
    )
    written = 0
    weight_map: dict[str, str] = {}
    done: list[str] = []  # files this call put in place, removed again if a later one fails
    try:
        for path, group in zip(files, groups, strict=True):
            with atomic_local_file(path) as handle:
                stream = SafetensorsStream(handle, [planned[i] for i in group], metadata)
                for index in group:
                    tensor, out = order[index], planned[index]
                    written += stream.write(out.name, _tensor_chunks(src, tensor, out.dtype))
                    weight_map[out.name] = os.path.basename(path)
                    if on_bytes is not None:
                        on_bytes(out.nbytes)
                stream.close()
            done.append(path)
        if max_shard_bytes is not None:
            index_data = {"metadata": {"total_size": written}, "weight_map": weight_map}
            with atomic_local_file(final) as handle:
                handle.write(json.dumps(index_data, indent=2).encode())
            done.append(final)
        copied = _copy_configs(src, folder, done) if copy_configs else []
    except BaseException:
        for path in reversed(done):
            with contextlib.suppress(OSError):
                os.unlink(path)
        if made_folder:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    if copied:
        plan.warnings.append(f"copied {', '.join(copied)} beside the output")
    return ConsolidationResult(
        output=final,
        tensors=len(planned),
        parameters=sum(math.prod(t.shape) for t in planned),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        stage=plan.stage,
        world_size=plan.world_size,
        aliases=aliases,
        warnings=tuple(plan.warnings),
        format=plan.format,
        dropped=plan.dropped,
        non_tensors=tuple(plan.non_tensors),
    )


def _select(
    plan: ConsolidationPlan, order: list[SourceTensor], selection: Selection, keep_tied: bool
) -> tuple[list[SourceTensor], dict[str, str]]:
    """The tensors ``selection`` keeps, renamed; ``plan.dropped`` counts the rest. Tied aliases follow their
    names; one whose owner lies outside the selection is not written (a warning says so) unless ``keep_tied``
    made it a copy."""
    if selection.is_default:
        return order, dict(plan.aliases)
    chosen = selection.apply([t.name for t in order])
    plan.dropped += len(order) - len(chosen)
    aliases: dict[str, str] = {}
    for alias, owner in plan.aliases.items():
        new_alias, new_owner = selection.rename(alias), chosen.get(owner)
        if new_alias is not None and new_owner is not None:
            aliases[new_alias] = new_owner
        elif new_alias is not None and not keep_tied:
            plan.warnings.append(
                f"{alias} is tied to {owner}, which lies outside the selection: not written (--keep-tied writes it)"
            )
    return [replace(t, name=chosen[t.name]) for t in order if t.name in chosen], aliases


def _consolidate_to_store(
    src: Location, out_url: str, out_options: dict[str, Any], **kwargs: Any
) -> ConsolidationResult:
    """OUT on an object store: consolidate into a local temporary folder, then upload the weights first and the
    index last, so a reader never finds an index naming shards that are not there yet."""
    import os
    import tempfile

    sharded = kwargs.get("max_shard_bytes") is not None or out_url.endswith("/")
    folder_url = out_url.rstrip("/") if sharded else out_url.rsplit("/", 1)[0]
    name = None if sharded else out_url.rsplit("/", 1)[1]
    target = Location.from_url(folder_url, out_options)
    target.require_bucket()
    final = "model.safetensors.index.json" if kwargs.get("max_shard_bytes") else (name or "model.safetensors")
    if target.exists(final) and not kwargs.get("force"):
        raise RefusedError(f"{target.url_of(final)} exists; pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix="ckptctl-consolidate-") as scratch:
        local_out = scratch + "/" if sharded else os.path.join(scratch, name or "model.safetensors")
        result = consolidate(src, local_out, **kwargs)
        files = sorted(os.listdir(scratch), key=lambda f: (f == final, f.endswith(".json"), f))
        for file in files:
            target.upload_file(os.path.join(scratch, file), file)
    return replace(result, output=target.url_of(final))


def _tensor_chunks(src: Location, tensor: SourceTensor, target: str) -> Iterator[bytes]:
    """A tensor's bytes in ``target`` dtype, read in bounded chunks and cut to its size (ZeRO-3 partitions are
    padded): memory stays bounded whatever the tensor's size (DCP chunks that are not slabs of the first
    dimension: about twice that tensor)."""
    where = tensor.location or src
    if tensor.chunks:
        pieces = assemble_chunks(where, tensor.name, tensor.dtype, tensor.shape, tensor.chunks)
    else:
        pieces = TensorSource(where, tensor.name, tensor.dtype, tensor.shape, tensor.pieces).chunks()
    for data in pieces:
        yield cast(data, tensor.dtype, target)


def _copy_configs(src: Location, folder: str, done: list[str]) -> list[str]:
    """Model config and tokenizer files found beside SRC (HF Trainer and open-instruct save them there), copied
    next to the output so it loads with ``from_pretrained``. Existing files (or links) are left alone; each file
    written is appended to ``done``."""
    import os

    from ckptctl.storage.atomic import atomic_write_local

    copied = []
    for name in MODEL_CONFIG_FILES:
        target = os.path.join(folder, name)
        if os.path.lexists(target) or not src.exists(name):
            continue
        atomic_write_local(target, src.read_bytes(name))
        done.append(target)
        copied.append(name)
    return copied
