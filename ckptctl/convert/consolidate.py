"""Any checkpoint's model weights -> safetensors (one file, or HF shards + index written last): select, cast,
write. Format-free: the format modules (``formats/sources.py`` picks one) say where each tensor's bytes are; this
module streams them, each tensor as it is read, so memory is bounded by one read piece, not the model.

Tied aliases are recorded in the header's ``__metadata__`` instead of being written twice, unless ``keep_tied``.

Sharded output can be split across machines (a Slurm job array, a Kubernetes Indexed Job): every worker makes the
same plan, writes the shards ``k % workers == worker_index`` and nothing else, and one ``finalize`` run checks
every shard's header against the plan before it copies the configs and writes the index, last. Each shard's
``__metadata__`` carries the plan's fingerprint (``ckptctl_plan``), in every sharded output, so one process and N
workers write the same bytes, and a worker that ran with other arguments, or on another step, is caught.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import IO, Any

import numpy as np

from ckptctl.convert.safetensors_writer import PlannedTensor, SafetensorsStream, encode_header
from ckptctl.convert.selection import Selection
from ckptctl.errors import (
    InputTooLargeError,
    IntegrityError,
    NoSuchBucketError,
    NotADirectoryRunError,
    NotFoundError,
    RefusedError,
    UsageError,
)
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import FileSource
from ckptctl.formats.sources import plan_source
from ckptctl.formats.tensor_layout import TensorPlan, TensorSource, to_numpy
from ckptctl.storage.atomic import atomic_local_file
from ckptctl.storage.location import FileEntry, Location, is_url, refuse_overlap

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
class ShardReport:
    """What one call did to the shards of a sharded output, for the report and ``--json``: ``written`` by it,
    ``skipped`` (already there, complete, from the same plan: a requeued worker resumes), ``verified`` (finalize),
    and ``removed`` (shards of an earlier run with another shard count, deleted after the new index was in place)."""

    mode: str
    """``all`` (one process wrote every shard), ``worker`` (this worker's share) or ``finalize``."""
    total: int
    plan: str
    """The plan fingerprint every shard carries (``ckptctl_plan``)."""
    workers: int | None = None
    worker_index: int | None = None
    written: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    verified: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}


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
    shards: ShardReport | None = None
    """Sharded output only (``--max-shard-size``); ``bytes`` is then what this call wrote, tensors and parameters
    those of the whole output."""

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
            "shards": self.shards.to_dict() if self.shards is not None else None,
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


INDEX_NAME = "model.safetensors.index.json"
PLAN_KEY = "ckptctl_plan"
"""The ``__metadata__`` key of every shard of a sharded output: its plan's fingerprint (``_shard_layout``)."""
_SHARD_NAME = re.compile(r"model-(\d{5,})-of-(\d{5,})\.safetensors")


def shard_name(number: int, total: int) -> str:
    """The HF name of shard ``number`` (from 1) of ``total``."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


@dataclass(frozen=True)
class ShardLayout:
    """The sharded output of one plan, the same on every worker given the same arguments: each file's name, the
    indexes of the ``tensors`` it holds (``_shards``), and the header metadata, which carries the fingerprint.
    Everything a shard's header and size must be is computed from it, without reading any tensor."""

    tensors: list[PlannedTensor]
    names: list[str]
    groups: list[list[int]]
    metadata: dict[str, str]

    @property
    def fingerprint(self) -> str:
        return self.metadata[PLAN_KEY]

    def header(self, k: int) -> bytes:
        return encode_header([self.tensors[i] for i in self.groups[k]], self.metadata)

    def size(self, k: int) -> int:
        return len(self.header(k)) + sum(self.tensors[i].nbytes for i in self.groups[k])

    def owner(self, k: int, workers: int) -> int:
        """The ``--worker-index`` that writes shard ``k`` (from 0): round robin, so the big and the small ones
        are spread over the workers."""
        return k % workers

    def index_bytes(self) -> bytes:
        """``model.safetensors.index.json`` as HF writes it: total data bytes and each tensor's shard."""
        weight_map = {
            self.tensors[i].name: name
            for name, group in zip(self.names, self.groups, strict=True)
            for i in group
        }
        total = sum(t.nbytes for t in self.tensors)
        return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()


def _shard_layout(
    src: Location,
    plan: TensorPlan,
    order: list[TensorSource],
    planned: list[PlannedTensor],
    metadata: dict[str, str],
    max_shard_bytes: int,
) -> ShardLayout:
    """The shards of this plan, their metadata stamped with a fingerprint: the sha256 of a canonical JSON of the
    source (format, resolved tag or step, each file read with its size), the output tensors (names, dtypes,
    shapes, in order), the grouping, ``max_shard_bytes`` and the other metadata. Other inputs, a moved ``latest``,
    another ``--prefix``/``--exclude``, ``--dtype`` or ``--max-shard-size`` give another fingerprint, so shards
    of two plans are never mixed into one index; one process and N workers write the same bytes."""
    groups = _shards(planned, max_shard_bytes)
    identity = {
        "version": 1,
        "source": {"format": plan.format, "tag": plan.tag, "files": _source_files(src, order)},
        "tensors": [[t.name, t.dtype, list(t.shape)] for t in planned],
        "groups": groups,
        "max_shard_bytes": max_shard_bytes,
        "metadata": metadata,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    names = [shard_name(i + 1, len(groups)) for i in range(len(groups))]
    return ShardLayout(planned, names, groups, {**metadata, PLAN_KEY: digest})


def _source_files(src: Location, order: list[TensorSource]) -> list[tuple[str, int]]:
    """Each file the tensors are read from, as (path below SRC, size), sorted. Sizes come from one listing of SRC
    (``plan_source`` made one already, so this doubles a cheap cost) or one stat of a file SRC; paths are
    relative and mtimes left out, so a copy of the checkpoint elsewhere (another disk, a bucket) plans the same."""
    wanted: dict[str, tuple[Location, str]] = {}
    for tensor in order:
        for item in (*tensor.ranges, *(chunk.range for chunk in tensor.chunks)):
            wanted.setdefault(tensor.location.full_path(item.rel), (tensor.location, item.rel))
    top_entry = src.stat()
    if top_entry.type == "file":
        sizes = {src.full_path(): top_entry.size}
    else:
        sizes = {src.full_path(e.path): e.size for e in src.walk() if e.type != "directory"}
    top = src.full_path().rstrip("/") + "/"
    files = []
    for path, (location, rel) in wanted.items():
        size = sizes[path] if path in sizes else location.stat(rel).size
        files.append((path[len(top) :] if path.startswith(top) else posixpath.basename(path), size))
    return sorted(files)


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
    workers: int | None = None,
    worker_index: int | None = None,
    finalize: bool = False,
) -> ConsolidationResult:
    """Write ``out_path`` (a .safetensors file or a folder, local or a URL) from the checkpoint at ``src``: a
    DeepSpeed ZeRO save (floats as fp32 unless ``dtype``, as ``zero_to_fp32``) or a DCP folder (dtypes as
    stored unless ``dtype``), its model weights narrowed by ``selection``.

    Each output file appears under its name only when complete (temp + rename); with ``max_shard_bytes`` the HF
    layout is written, shards first and ``model.safetensors.index.json`` last. ``on_bytes(n)`` reports progress.
    An OUT that is, contains or lies inside SRC is refused before anything is read or written; when writing
    fails (a full disk), every file this call wrote is removed again.

    With ``workers`` and ``worker_index`` only that worker's shards are written (see ``_run_worker``); with
    ``finalize`` every shard is verified and the configs and index are written (``_finalize``).
    """
    import os

    started = time.perf_counter()
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--dtype takes {', '.join(OUTPUT_DTYPES)}; got {dtype!r}")
    _check_worker_flags(workers, worker_index, finalize, max_shard_bytes)
    remote_out = is_url(out_path)
    out_location = Location.from_url(out_path, out_options if remote_out else None)
    refuse_overlap(out_location, src, output_role="OUT", source_role="SRC")

    def prepare() -> _Prepared:
        return _prepare(
            src, tag=tag, dtype=dtype, exclude_frozen=exclude_frozen, keep_tied=keep_tied, selection=selection
        )

    if max_shard_bytes is not None and finalize:
        return _finalize(src, out_location, prepare, max_shard_bytes, workers, force, copy_configs)
    if max_shard_bytes is not None and workers is not None and worker_index is not None:
        return _run_worker(
            src, out_location, prepare, max_shard_bytes, workers, worker_index, force, on_bytes
        )
    if remote_out:
        return _consolidate_to_store(
            src,
            out_path,
            out_options or {},
            prepare,
            force=force,
            max_shard_bytes=max_shard_bytes,
            copy_configs=copy_configs,
            on_bytes=on_bytes,
        )
    if os.path.isdir(out_path) or out_path.endswith("/") or max_shard_bytes is not None:
        folder = out_path
        final = os.path.join(folder, INDEX_NAME if max_shard_bytes else "model.safetensors")
    else:
        folder = os.path.dirname(os.path.abspath(out_path))
        final = out_path
    if os.path.exists(final) and not force:
        raise RefusedError(f"{final} exists; pass --force to replace it")
    plan, order, planned, aliases, metadata = prepare()
    layout = _sharded(src, plan, order, planned, metadata, max_shard_bytes)
    made_folder = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    files = [final] if layout is None else [os.path.join(folder, name) for name in layout.names]
    done: list[str] = []  # files this call put in place, removed again if a later one fails
    try:
        written = _write_output(files, layout, order, planned, metadata, atomic_local_file, on_bytes, done)
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
        if layout is not None:  # last, as on a store: an index names only files already in place
            with atomic_local_file(final) as handle:
                handle.write(layout.index_bytes())
            done.append(final)
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
    report = None
    if layout is not None:
        report = _all_written(layout, _remove_stale(Location.from_url(folder), layout, plan.warnings, force))
    return _result(plan, final, planned, written, aliases, started, report)


_Prepared = tuple[TensorPlan, list[TensorSource], list[PlannedTensor], dict[str, str], dict[str, str]]


def _check_worker_flags(
    workers: int | None, worker_index: int | None, finalize: bool, max_shard_bytes: int | None
) -> None:
    """The combinations of ``--workers``, ``--worker-index`` and ``--finalize`` that mean something, refused
    before anything is read: a worker needs both numbers and the sharded layout, finalize runs once for all."""
    hint = (
        'each worker: --max-shard-size SIZE --workers N --worker-index "$SLURM_ARRAY_TASK_ID" (0..N-1); '
        "then once: --max-shard-size SIZE --finalize"
    )
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1; got {workers}", hint=hint)
    if worker_index is not None and workers is None:
        raise UsageError("--worker-index needs --workers N (how many workers share the output)", hint=hint)
    if finalize and worker_index is not None:
        raise UsageError("--finalize runs once, after all workers: it takes no --worker-index", hint=hint)
    if (workers is not None or finalize) and max_shard_bytes is None:
        flag = "--finalize" if finalize else "--workers"
        raise UsageError(
            f"{flag} needs --max-shard-size: workers split the sharded layout (one file cannot be split)",
            hint=hint,
        )
    if workers is not None and worker_index is None and not finalize:
        raise UsageError(
            f"--workers {workers} needs --worker-index I (0..{workers - 1}), or --finalize", hint=hint
        )
    if workers is not None and worker_index is not None and not 0 <= worker_index < workers:
        raise UsageError(
            f"--worker-index {worker_index} is outside 0..{workers - 1} (--workers {workers})", hint=hint
        )


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
    open_new: Callable[[str], contextlib.AbstractContextManager[IO[bytes]]],
    on_bytes: Callable[[int], None] | None,
    done: list[str],
) -> int:
    """Stream each output file through ``open_new(path)`` (a local temp + rename, or a multipart upload that is
    aborted on failure): header first, then each tensor as it is read and cast, so memory is one read piece (plus
    one upload part). Each finished path is appended to ``done``; returns the tensor bytes written."""
    written = 0
    for path, group in zip(files, groups, strict=True):
        with open_new(path) as handle:
            stream = SafetensorsStream(handle, [planned[i] for i in group], metadata)
            for index in group:
                tensor, out = order[index], planned[index]
                written += stream.write(out.name, _tensor_chunks(tensor, out.dtype))
                if on_bytes is not None:
                    on_bytes(out.nbytes)
            stream.close()
        done.append(path)
    return written


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
    shards: ShardReport | None = None,
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
        shards=shards,
    )


def _consolidate_to_store(
    src: Location,
    out_url: str,
    out_options: dict[str, Any],
    prepare: Callable[[], _Prepared],
    *,
    force: bool,
    max_shard_bytes: int | None,
    copy_configs: bool,
    on_bytes: Callable[[int], None] | None,
) -> ConsolidationResult:
    """OUT on an object store, streamed: each output file is a multipart upload fed as its tensors are read
    (``storage.atomic.new_object``: aborted, never completed, on failure), so no local copy is made and memory is
    one upload part plus one read piece. Weights first, configs, the index last: a reader never finds an index
    naming shards that are not there yet, and a killed run leaves no index."""
    started = time.perf_counter()
    sharded = max_shard_bytes is not None or out_url.endswith("/")
    folder_url = out_url.rstrip("/") if sharded else out_url.rsplit("/", 1)[0]
    name = None if sharded else out_url.rsplit("/", 1)[1]
    target = Location.from_url(folder_url, out_options)
    target.require_bucket()
    final = INDEX_NAME if max_shard_bytes is not None else (name or "model.safetensors")
    if target.exists(final) and not force:
        raise RefusedError(f"{target.url_of(final)} exists; pass --force to replace it")
    plan, order, planned, aliases, metadata = prepare()
    layout = _sharded(src, plan, order, planned, metadata, max_shard_bytes)
    files = [final] if layout is None else layout.names
    done: list[str] = []
    try:
        written = _write_output(
            files, layout, order, planned, metadata, _shard_opener(target), on_bytes, done
        )
        copied = _copy_configs(src, target.exists, _writer(target.write_bytes), done) if copy_configs else []
        if layout is not None:
            target.write_bytes(final, layout.index_bytes())
            done.append(final)
    except BaseException:
        with contextlib.suppress(Exception):
            target.delete_files(done, verify=False)
        raise
    if copied:
        plan.warnings.append(f"copied {', '.join(copied)} beside the output")
    report = (
        None if layout is None else _all_written(layout, _remove_stale(target, layout, plan.warnings, force))
    )
    return _result(plan, target.url_of(final), planned, written, aliases, started, report)


def _sharded(
    src: Location,
    plan: TensorPlan,
    order: list[TensorSource],
    planned: list[PlannedTensor],
    metadata: dict[str, str],
    max_shard_bytes: int | None,
) -> ShardLayout | None:
    """The shard layout of a sharded output (``--max-shard-size``), None for one file."""
    if max_shard_bytes is None:
        return None
    return _shard_layout(src, plan, order, planned, metadata, max_shard_bytes)


def _write_output(
    files: list[str],
    layout: ShardLayout | None,
    order: list[TensorSource],
    planned: list[PlannedTensor],
    metadata: dict[str, str],
    open_new: Callable[[str], contextlib.AbstractContextManager[IO[bytes]]],
    on_bytes: Callable[[int], None] | None,
    done: list[str],
) -> int:
    """Every file of the output (one file, or each shard of ``layout`` with its fingerprinted metadata) through
    ``_write_shards``; the one write step of local and store output alike."""
    if layout is None:
        return _write_shards(
            files, _shards(planned, None), order, planned, metadata, open_new, on_bytes, done
        )
    return _write_shards(files, layout.groups, order, planned, layout.metadata, open_new, on_bytes, done)


def _shard_opener(folder: Location) -> Callable[[str], contextlib.AbstractContextManager[IO[bytes]]]:
    """How a file named ``rel`` is created in ``folder``: locally a temp file renamed into place, on a store a
    multipart upload completed only when the block ends (``storage.atomic.new_object``); either way the name
    appears only when the file is whole."""
    from ckptctl.storage.atomic import new_object

    if folder.is_local:
        return lambda rel: atomic_local_file(folder.full_path(rel))

    @contextlib.contextmanager
    def open_new(rel: str) -> Iterator[IO[bytes]]:
        with folder.errors(rel), new_object(folder.fs, folder.full_path(rel)) as handle:
            yield handle

    return open_new


def _all_written(layout: ShardLayout, removed: list[str]) -> ShardReport:
    return ShardReport(
        "all", len(layout.names), layout.fingerprint, written=tuple(layout.names), removed=tuple(removed)
    )


# -- one output, several workers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardProblem:
    """Why one expected shard is not the file its plan makes."""

    name: str
    reason: str
    foreign: bool
    """Not this plan's output (no readable header, no fingerprint, another plan's): replaced only with --force.
    A missing shard, or one of this plan that is cut or altered, is simply written (again)."""


def _listed(folder: Location) -> dict[str, FileEntry]:
    """The files and links at the top of the output folder, from one fresh listing (other workers write there:
    nothing cached from an earlier look is trusted); empty when the folder does not exist yet."""
    try:
        entries = folder.walk()
    except NoSuchBucketError:
        raise
    except NotADirectoryRunError:
        raise UsageError(
            f"{folder.url} is a file; --max-shard-size writes a folder of shards", url=folder.url
        ) from None
    except NotFoundError:
        return {}
    return {e.path: e for e in entries if "/" not in e.path and e.type != "directory"}


def _check_shard(
    folder: Location, entry: FileEntry | None, layout: ShardLayout, k: int
) -> ShardProblem | None:
    """None when shard ``k`` as listed is exactly what the plan makes: its header is byte for byte the planned
    one (names, dtypes, shapes, offsets, fingerprint) and its size is 8 + header + data. Reads the header only
    (``read_safetensors_header``: the length first, over 100 MB refused, one or two ranged reads), never tensor
    data, so checking a multi-terabyte output costs a request or two per shard."""
    name = layout.names[k]
    if entry is None:
        return ShardProblem(name, "missing", foreign=False)
    if entry.type != "file":
        return ShardProblem(name, "a link, not a file", foreign=True)
    source = FileSource(folder, name, entry.size)
    try:
        found = read_safetensors_header(source)
    except NotFoundError:
        return ShardProblem(name, "missing", foreign=False)
    except IntegrityError as exc:
        return ShardProblem(name, f"no readable safetensors header ({exc.message})", foreign=True)
    mark = found.metadata.get(PLAN_KEY)
    if mark != layout.fingerprint:
        reason = "no plan fingerprint" if mark is None else "written by another plan"
        return ShardProblem(name, f"{reason} (other arguments, or another step of SRC)", foreign=True)
    if source.read(0, 8 + found.header_length) != layout.header(k):
        return ShardProblem(name, "a header that differs from its plan's", foreign=False)
    if entry.size != layout.size(k):
        return ShardProblem(
            name,
            f"{entry.size:,} bytes where its plan makes {layout.size(k):,} (cut or padded)",
            foreign=False,
        )
    return None


_SAME_ARGUMENTS = (
    "every worker and --finalize need the same SRC, --tag, --prefix/--exclude, --dtype and --max-shard-size "
    "(pin the step with --tag, so a moving latest cannot split them)"
)


def _run_worker(
    src: Location,
    folder: Location,
    prepare: Callable[[], _Prepared],
    max_shard_bytes: int,
    workers: int,
    worker_index: int,
    force: bool,
    on_bytes: Callable[[int], None] | None,
) -> ConsolidationResult:
    """Write the shards ``k % workers == worker_index`` of the plan every worker makes alike, and nothing else
    (no index, no configs: ``_finalize`` writes those once). A shard already there from the same plan, whole, is
    skipped, so a requeued array task resumes where it was killed; one from another plan (or not ckptctl's) is
    refused before anything is written, unless ``force``. Shards finished before a failure are kept for the
    rerun; the one being written never appears (temp + rename, or an aborted upload)."""
    started = time.perf_counter()
    if not folder.is_local:
        folder.require_bucket()
    listing = _listed(folder)
    if INDEX_NAME in listing and not force:
        raise RefusedError(f"{folder.url_of(INDEX_NAME)} exists; pass --force to replace it")
    plan, order, planned, aliases, metadata = prepare()
    layout = _shard_layout(src, plan, order, planned, metadata, max_shard_bytes)
    mine = [k for k in range(len(layout.names)) if layout.owner(k, workers) == worker_index]
    todo: list[int] = []
    skipped: list[str] = []
    for k in mine:
        problem = _check_shard(folder, listing.get(layout.names[k]), layout, k)
        if problem is None:
            skipped.append(layout.names[k])
        elif problem.foreign and not force:
            raise RefusedError(
                f"{folder.url_of(problem.name)}: {problem.reason}; pass --force to replace it",
                url=folder.url_of(problem.name),
                hint=_SAME_ARGUMENTS,
            )
        else:
            todo.append(k)
    if not mine:
        plan.warnings.append(
            f"worker {worker_index} has no shard: the plan makes {len(layout.names)}, fewer than --workers {workers}"
        )
    names = [layout.names[k] for k in todo]
    written = _write_shards(
        names,
        [layout.groups[k] for k in todo],
        order,
        planned,
        layout.metadata,
        _shard_opener(folder),
        on_bytes,
        [],
    )
    report = ShardReport(
        "worker",
        len(layout.names),
        layout.fingerprint,
        workers=workers,
        worker_index=worker_index,
        written=tuple(names),
        skipped=tuple(skipped),
    )
    return _result(plan, folder.url, planned, written, aliases, started, report)


def _finalize(
    src: Location,
    folder: Location,
    prepare: Callable[[], _Prepared],
    max_shard_bytes: int,
    workers: int | None,
    force: bool,
    copy_configs: bool,
) -> ConsolidationResult:
    """After all workers: make the plan again, check every shard it names (``_check_shard``: headers and sizes,
    never tensor data), and only when all are right copy the configs and write the index, last, so a reader that
    finds the index finds every shard whole. Anything missing or wrong is refused in one line naming the files and
    the ``--worker-index`` to rerun, and nothing is written. Run again on a finished output, it finds the index it
    would write and rewrites it unchanged; another index there needs ``force``."""
    started = time.perf_counter()
    if not folder.is_local:
        folder.require_bucket()
    listing = _listed(folder)
    plan, order, planned, aliases, metadata = prepare()
    layout = _shard_layout(src, plan, order, planned, metadata, max_shard_bytes)
    index = layout.index_bytes()
    if INDEX_NAME in listing and not force and not _holds(folder, INDEX_NAME, index):
        raise RefusedError(f"{folder.url_of(INDEX_NAME)} exists; pass --force to replace it")
    problems = [
        problem
        for k in range(len(layout.names))
        if (problem := _check_shard(folder, listing.get(layout.names[k]), layout, k)) is not None
    ]
    if problems:
        raise _not_ready(folder, layout, problems, workers)
    done: list[str] = []
    copied = (
        _copy_configs(src, lambda name: name in listing, _writer(folder.write_bytes), done)
        if copy_configs
        else []
    )
    folder.write_bytes(INDEX_NAME, index)
    if copied:
        plan.warnings.append(f"copied {', '.join(copied)} beside the output")
    removed = _remove_stale(folder, layout, plan.warnings, force)
    report = ShardReport(
        "finalize",
        len(layout.names),
        layout.fingerprint,
        workers=workers,
        verified=tuple(layout.names),
        removed=tuple(removed),
    )
    return _result(plan, folder.url_of(INDEX_NAME), planned, 0, aliases, started, report)


def _holds(folder: Location, rel: str, data: bytes) -> bool:
    """Whether ``rel`` holds exactly ``data`` (read no further than its length)."""
    try:
        return folder.read_bytes(rel, max_bytes=len(data)) == data
    except (InputTooLargeError, NotFoundError):
        return False


def _not_ready(
    folder: Location, layout: ShardLayout, problems: list[ShardProblem], workers: int | None
) -> RefusedError:
    """One line for every shard finalize cannot accept (the first few named per reason) and who must rerun."""
    by_reason: dict[str, list[str]] = {}
    for problem in problems:
        by_reason.setdefault(problem.reason, []).append(problem.name)
    parts = [
        f"{reason}: {', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"
        for reason, names in by_reason.items()
    ]
    if workers is not None:
        position = {name: k for k, name in enumerate(layout.names)}
        owners = sorted({layout.owner(position[p.name], workers) for p in problems})
        rerun = f"rerun --worker-index {','.join(map(str, owners))} of --workers {workers}"
    else:
        rerun = "rerun the worker of each (--worker-index = shard number - 1 mod N; --finalize --workers N names it)"
    foreign = any(p.foreign for p in problems)
    return RefusedError(
        f"{folder.url} is not finalized: {len(problems)} of {len(layout.names)} shards not ready "
        f"({'; '.join(parts)}); {rerun}; no index written",
        url=folder.url,
        hint=(_SAME_ARGUMENTS + "; --force on a worker replaces a shard of another plan")
        if foreign
        else "rerun those workers (they skip the shards already done), then --finalize again",
    )


def _remove_stale(folder: Location, layout: ShardLayout, warnings: list[str], force: bool) -> list[str]:
    """With ``force`` (the user asked to replace the output), delete the shards of an earlier ckptctl output
    with another shard count, which would otherwise lie beside the new ones: only files named
    ``model-0000k-of-0000M.safetensors`` with M not this plan's whose header carries a plan fingerprint (so
    ckptctl wrote them: never a model someone put there), only after the new index is in place (no index ever
    names a missing file), and nothing else (no links, no sub-folders). Returns what was removed; a file that
    would not go is a warning."""
    if not force:
        return []
    total = len(layout.names)
    stale = sorted(
        name
        for name, entry in _listed(folder).items()
        if entry.type == "file"
        and (match := _SHARD_NAME.fullmatch(name))
        and int(match.group(2)) != total
        and _written_by_ckptctl(folder, name, entry.size)
    )
    if not stale:
        return []
    left = folder.delete_files(stale)
    removed = [name for name in stale if name not in left]
    if removed:
        warnings.append(
            f"removed {len(removed)} shard(s) of an earlier output: {', '.join(removed[:4])}"
            + (f" and {len(removed) - 4} more" if len(removed) > 4 else "")
        )
    if left:
        warnings.append(f"could not remove {len(left)} shard(s) of an earlier output: {', '.join(left[:4])}")
    return removed


def _written_by_ckptctl(folder: Location, name: str, size: int) -> bool:
    """Whether ``name`` is a safetensors file whose header carries a plan fingerprint (one header read)."""
    try:
        return PLAN_KEY in read_safetensors_header(FileSource(folder, name, size)).metadata
    except (IntegrityError, NotFoundError):
        return False


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
