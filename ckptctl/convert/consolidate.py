"""Any checkpoint's model weights -> safetensors (one file, or HF shards + index written last): select, cast,
write. Format-free: the format modules (``formats/sources.py`` picks one) say where each tensor's bytes are; this
module streams them, each tensor as it is read, so memory is bounded by one read piece, not the model.

Tied aliases are recorded in the header's ``__metadata__`` instead of being written twice, unless ``keep_tied``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ckptctl.convert.safetensors_writer import PlannedTensor, SafetensorsStream
from ckptctl.convert.selection import Selection
from ckptctl.errors import RefusedError, UsageError
from ckptctl.formats.sources import plan_source
from ckptctl.formats.tensor_layout import TensorPlan, TensorSource, to_numpy
from ckptctl.storage.atomic import atomic_local_file
from ckptctl.storage.location import Location, is_url, refuse_overlap

OUTPUT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_CASTABLE = {"float64", "float32", "float16", "bfloat16"}
"""The floating dtypes ``cast`` converts; integer, bool and 8-bit float tensors are written as stored."""


def cast(data: bytes, source: str, target: str) -> bytes:
    """Convert raw little-endian bytes between dtypes; float -> bf16 rounds to nearest even like torch."""
    if source == target:
        return data
    values = to_numpy(data, source).astype(np.float32)
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
    plan, order, planned, aliases, metadata = _prepare(
        src, tag=tag, dtype=dtype, exclude_frozen=exclude_frozen, keep_tied=keep_tied, selection=selection
    )
    made_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    groups = _shards(planned, max_shard_bytes)
    files = (
        [final]
        if max_shard_bytes is None
        else [
            os.path.join(folder, f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
            for i in range(len(groups))
        ]
    )
    done: list[str] = []  # files this call put in place, removed again if a later one fails
    try:
        written, weight_map = _write_shards(
            files, groups, order, planned, metadata, atomic_local_file, on_bytes, done, os.path.basename
        )
        if max_shard_bytes is not None:
            index_data = {"metadata": {"total_size": written}, "weight_map": weight_map}
            with atomic_local_file(final) as handle:
                handle.write(json.dumps(index_data, indent=2).encode())
            done.append(final)
        copied = (
            _copy_configs(
                src,
                lambda name: os.path.lexists(os.path.join(folder, name)),
                lambda name, data: _local_write(os.path.join(folder, name), data),
                done,
            )
            if copy_configs
            else []
        )
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
    return _result(plan, final, planned, written, aliases, started)


def _prepare(
    src: Location,
    *,
    tag: str | None,
    dtype: str | None,
    exclude_frozen: bool,
    keep_tied: bool,
    selection: Selection | None,
) -> tuple[TensorPlan, list[TensorSource], list[PlannedTensor], dict[str, str], dict[str, str]]:
    """The plan, the tensors to write (in order), their output names/dtypes/shapes, the aliases and the header
    metadata: everything about the output that does not depend on where it goes."""
    plan = plan_source(src, tag=tag, exclude_frozen=exclude_frozen)
    target = OUTPUT_DTYPES[dtype] if dtype else plan.default_dtype
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
    planned = [
        PlannedTensor(t.name, target if target and t.dtype in _CASTABLE else t.dtype, t.shape) for t in order
    ]
    metadata = {"format": "pt"}
    if aliases and not keep_tied:
        metadata["tied_aliases"] = json.dumps(aliases, sort_keys=True)
    return plan, order, planned, aliases, metadata


def _write_shards(
    files: list[str],
    groups: list[list[int]],
    order: list[TensorSource],
    planned: list[PlannedTensor],
    metadata: dict[str, str],
    open_new: Callable[[str], contextlib.AbstractContextManager[Any]],
    on_bytes: Callable[[int], None] | None,
    done: list[str],
    name_of: Callable[[str], str],
) -> tuple[int, dict[str, str]]:
    """Stream each output file through ``open_new(path)`` (a local temp + rename, or a multipart upload that is
    aborted on failure): header first, then each tensor as it is read and cast, so memory is one read piece (plus
    one upload part). Each finished path is appended to ``done``; returns bytes written and the weight map."""
    written = 0
    weight_map: dict[str, str] = {}
    for path, group in zip(files, groups, strict=True):
        with open_new(path) as handle:
            stream = SafetensorsStream(handle, [planned[i] for i in group], metadata)
            for index in group:
                tensor, out = order[index], planned[index]
                written += stream.write(out.name, _tensor_chunks(tensor, out.dtype))
                weight_map[out.name] = name_of(path)
                if on_bytes is not None:
                    on_bytes(out.nbytes)
            stream.close()
        done.append(path)
    return written, weight_map


def _select(
    plan: TensorPlan, order: list[TensorSource], selection: Selection, keep_tied: bool
) -> tuple[list[TensorSource], dict[str, str]]:
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


def _result(
    plan: TensorPlan,
    final: str,
    planned: list[PlannedTensor],
    written: int,
    aliases: dict[str, str],
    started: float,
) -> ConsolidationResult:
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


def _consolidate_to_store(
    src: Location,
    out_url: str,
    out_options: dict[str, Any],
    *,
    tag: str | None,
    dtype: str | None,
    exclude_frozen: bool,
    keep_tied: bool,
    force: bool,
    max_shard_bytes: int | None,
    copy_configs: bool,
    on_bytes: Callable[[int], None] | None,
    selection: Selection | None,
) -> ConsolidationResult:
    """OUT on an object store, streamed: each output file is a multipart upload fed as its tensors are read
    (``storage.atomic.new_object``: aborted, never completed, on failure), so no local copy is made and memory is
    one upload part plus one read piece. Weights first, configs, the index last: a reader never finds an index
    naming shards that are not there yet, and a killed run leaves no index."""
    from ckptctl.storage.atomic import new_object

    started = time.perf_counter()
    sharded = max_shard_bytes is not None or out_url.endswith("/")
    folder_url = out_url.rstrip("/") if sharded else out_url.rsplit("/", 1)[0]
    name = None if sharded else out_url.rsplit("/", 1)[1]
    target = Location.from_url(folder_url, out_options)
    target.require_bucket()
    final = "model.safetensors.index.json" if max_shard_bytes is not None else (name or "model.safetensors")
    if target.exists(final) and not force:
        raise RefusedError(f"{target.url_of(final)} exists; pass --force to replace it")
    plan, order, planned, aliases, metadata = _prepare(
        src, tag=tag, dtype=dtype, exclude_frozen=exclude_frozen, keep_tied=keep_tied, selection=selection
    )
    groups = _shards(planned, max_shard_bytes)
    files = (
        [final]
        if max_shard_bytes is None
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )

    @contextlib.contextmanager
    def open_new(rel: str) -> Iterator[Any]:
        with target.errors(rel), new_object(target.fs, target.full_path(rel)) as handle:
            yield handle

    done: list[str] = []
    try:
        written, weight_map = _write_shards(
            files, groups, order, planned, metadata, open_new, on_bytes, done, lambda rel: rel
        )
        copied = _copy_configs(src, target.exists, _writer(target.write_bytes), done) if copy_configs else []
        if max_shard_bytes is not None:
            index_data = {"metadata": {"total_size": written}, "weight_map": weight_map}
            target.write_bytes(final, json.dumps(index_data, indent=2).encode())
            done.append(final)
    except BaseException:
        with contextlib.suppress(Exception):
            target.delete_files(done, verify=False)
        raise
    if copied:
        plan.warnings.append(f"copied {', '.join(copied)} beside the output")
    return _result(plan, target.url_of(final), planned, written, aliases, started)


def _tensor_chunks(tensor: TensorSource, target: str) -> Iterator[bytes]:
    """A tensor's bytes in ``target`` dtype, read in bounded chunks (``TensorSource.stream``)."""
    for data in tensor.stream():
        yield cast(data, tensor.dtype, target)


def _copy_configs(
    src: Location, present: Callable[[str], bool], write: Callable[[str, bytes], str], done: list[str]
) -> list[str]:
    """Model config and tokenizer files found beside SRC (HF Trainer and open-instruct save them there), copied
    next to the output so it loads with ``from_pretrained``. Those already there (or links) are left alone;
    ``write(name, data)`` puts one in place (atomically) and returns its path, which is appended to ``done``."""
    copied = []
    for name in MODEL_CONFIG_FILES:
        if present(name) or not src.exists(name):
            continue
        done.append(write(name, src.read_bytes(name)))
        copied.append(name)
    return copied


def _local_write(path: str, data: bytes) -> str:
    from ckptctl.storage.atomic import atomic_write_local

    atomic_write_local(path, data)
    return path


def _writer(write_bytes: Callable[[str, bytes], None]) -> Callable[[str, bytes], str]:
    """An object store's ``write_bytes`` (one PUT: the object appears whole), returning the name written."""

    def write(name: str, data: bytes) -> str:
        write_bytes(name, data)
        return name

    return write
