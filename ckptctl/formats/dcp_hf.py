"""Checkpoints of DCP's Hugging Face writer (``HuggingFaceStorageWriter(save_distributed=True)``).

Every rank writes ``sharded/shard-<RANK>-model-<I>-of-<N>.safetensors`` (ranks numbered from 1, one file per
output index it holds pieces of), whose ``__metadata__`` ``DCP_SHARDING_INFO`` gives each piece's
``saved_offsets`` in the global tensor; its shape is the piece's own header shape. With consolidation on (torchtitan
``last_save_in_hf``) rank 0 then writes ``model-<I>-of-<N>.safetensors`` and ``model.safetensors.index.json``
beside ``sharded/``, and leaves ``sharded/`` behind.

No file records a global shape, the world size or the file set, so a missing rank file gives smaller but
plausible tensors (torch's consolidator returns success then). Here it is caught from what is there, before a
byte is written: the pieces must tile the shape they span (a gap, an overlap, pieces that do not start at 0),
rank numbers and output indices must not skip, every rank must have a file for every output index, and when the
index is there its tensor list and ``total_size`` and the consolidated files' headers must agree with the
pieces (shapes only shrink when pieces are lost, so an equal ``total_size`` proves none were). Integer and bool
tensors are read as stored (torch's consolidator sizes dtypes with ``torch.finfo`` and raises on them).

Which files are read: the consolidated ones when the index and every file it names are there (checked against
``sharded/`` first), else the pieces in ``sharded/``; the plan's warnings say which. Costs one listing and one
header read per file; no torch.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ckptctl.errors import IntegrityError, NotFoundError
from ckptctl.formats.dcp import chunk_defects
from ckptctl.formats.model import checked_shape, nbytes_of
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import FileSource
from ckptctl.formats.tensor_layout import Chunk, Range, TensorPlan, TensorSource
from ckptctl.formats.torch_state import model_subtree, open_file, refuse_defects
from ckptctl.storage.location import FileEntry, Location

SHARDED_DIR = "sharded"
INDEX = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"^shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors$")
SHARDING_INFO = "DCP_SHARDING_INFO"


def _shard_name(rank: int, index: int, count: int) -> str:
    return f"shard-{rank:05d}-model-{index:05d}-of-{count:05d}.safetensors"


def find_dcp_hf_folder(entries: Sequence[FileEntry], tag: str | None) -> str | None:
    """The folder (relative) of an HF-writer save's shard files among ``entries``: the top level (SRC is
    ``sharded/``), ``sharded`` (SRC is torchtitan's ``step-N/``), ``<tag>/sharded``, or the only
    ``<step>/sharded`` of a run folder. None when nothing here is one; NotFoundError when several are and no
    ``tag`` says which."""
    found = set()
    for entry in entries:
        folder, _, name = entry.path.rpartition("/")
        if entry.type == "file" and SHARD_FILE.match(name):
            found.add(folder)
    if tag is not None:
        return next((f for f in (f"{tag}/{SHARDED_DIR}", tag) if f in found), None)
    for folder in ("", SHARDED_DIR):
        if folder in found:
            return folder
    steps = sorted(f for f in found if f.count("/") == 1 and f.endswith(f"/{SHARDED_DIR}"))
    if len(steps) > 1:
        names = [s.split("/")[0] for s in steps]
        raise NotFoundError(
            f"several DCP HF-writer checkpoints here ({', '.join(names)})",
            hint=f"pass --tag, e.g. --tag {names[-1]}",
        )
    return steps[0] if steps else None


def refuse_rank_piece(location: Location) -> None:
    """A single ``shard-R-model-I-of-N.safetensors`` given as SRC is one rank's pieces: read as a state dict it
    would give short tensors that look whole, so it is refused (its folder is the checkpoint)."""
    if SHARD_FILE.match(location.name):
        raise IntegrityError(
            f"{location.url} holds one rank's pieces of a DCP HF-writer save, not whole tensors",
            url=location.url,
            hint="pass the folder holding every rank's shard files",
        )


@dataclass(frozen=True)
class _Piece:
    rel: str
    """The shard file, relative to the plan's location."""
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    span: tuple[int, int]


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    """Inferred: the end of the farthest piece in each dimension."""
    pieces: tuple[_Piece, ...]


def _shard_files(location: Location, folder: str, files: dict[str, FileEntry]) -> dict[tuple[int, int], str]:
    """(rank, output index) -> shard file, after the numbering checks: one ``-of-N`` for all, indices 1..N
    each written by some rank, ranks 1..R without a skip, and each rank with a file for every index (FSDP and
    TP ranks hold a piece, maybe empty, of every sharded tensor; a file lost shrinks its tensors silently)."""
    base = f"{folder}/" if folder else ""
    where = location.url_of(folder)
    named: dict[tuple[int, int], str] = {}
    counts: dict[int, str] = {}
    for path in files:
        if not path.startswith(base) or "/" in path[len(base) :]:
            continue
        match = SHARD_FILE.match(path[len(base) :])
        if match:
            rank, index, count = (int(g) for g in match.groups())
            counts.setdefault(count, path[len(base) :])
            if not 1 <= index <= count:
                raise IntegrityError(f"{location.url_of(path)}: output index {index} is not in 1..{count}")
            named[(rank, index)] = path
    if len(counts) > 1:
        shown = " and ".join(f"-of-{c:05d} ({n})" for c, n in sorted(counts.items())[:2])
        raise IntegrityError(
            f"{where}: shard files disagree on the number of output files: {shown}", url=where
        )
    count = next(iter(counts))
    ranks = sorted({r for r, _ in named})
    indices = {i for _, i in named}
    for index in range(1, count + 1):
        if index not in indices:
            raise IntegrityError(
                f"{where}: no shard-*-model-{index:05d}-of-{count:05d}.safetensors: output file {index} of "
                f"{count} has no rank's pieces (rank files are missing)",
                url=where,
            )
    for rank in range(1, ranks[-1] + 1):
        if rank not in ranks:
            raise IntegrityError(
                f"{where}: no shard-{rank:05d}-model-*-of-{count:05d}.safetensors: rank {rank} is missing "
                f"(ranks are numbered from 1; found {', '.join(map(str, ranks))})",
                url=where,
            )
    return named


def _read_pieces(
    location: Location, named: dict[tuple[int, int], str], files: dict[str, FileEntry]
) -> list[_Tensor]:
    """Every tensor from its pieces (header shape + ``saved_offsets``), its dtype the same in all, its shape
    the farthest piece end in each dimension, and the pieces tiling that shape (formats/dcp.py's check)."""
    found: dict[str, list[_Piece]] = {}
    dtypes: dict[str, tuple[str, str]] = {}
    for key in sorted(named):
        rel = named[key]
        url = location.url_of(rel)
        header = read_safetensors_header(FileSource(location, rel, files[rel].size))
        refuse_defects(location, rel, header.defects)
        try:
            info = json.loads(header.metadata[SHARDING_INFO])
        except (KeyError, ValueError):
            info = None
        if not isinstance(info, dict):
            raise IntegrityError(
                f"{url}: no {SHARDING_INFO} metadata: not written by DCP's HF writer", url=url
            )
        for tensor in header.tensors:
            entry = info.get(tensor.name)
            offsets = entry.get("saved_offsets") if isinstance(entry, dict) else None
            what = f"{url}: tensor {tensor.name!r}: saved_offsets"
            if offsets is None:
                raise IntegrityError(f"{what} missing from {SHARDING_INFO}", url=url)
            offsets = checked_shape(offsets, what)
            if len(offsets) != len(tensor.shape):
                raise IntegrityError(
                    f"{what} {list(offsets)} do not match its shape {list(tensor.shape)}", url=url
                )
            known = dtypes.setdefault(tensor.name, (tensor.dtype, rel))
            if known[0] != tensor.dtype:
                raise IntegrityError(
                    f"{url}: tensor {tensor.name!r} is {tensor.dtype} here but {known[0]} in {known[1]}",
                    url=url,
                )
            found.setdefault(tensor.name, []).append(
                _Piece(rel, offsets, tensor.shape, header.spans[tensor.name])
            )
    tensors = []
    for name, pieces in found.items():
        ndims = {len(p.sizes) for p in pieces}
        if len(ndims) > 1:
            raise IntegrityError(
                f"tensor {name!r}: its pieces disagree on the number of dimensions ({pieces[0].rel})"
            )
        shape = tuple(max(p.offsets[d] + p.sizes[d] for p in pieces) for d in range(ndims.pop()))
        problems = chunk_defects(name, shape, [(p.offsets, p.sizes) for p in pieces], exhaustive=True)
        if problems:
            where = location.url_of(posixpath.dirname(pieces[0].rel))
            files_of = ", ".join(sorted({posixpath.basename(p.rel) for p in pieces}))
            raise IntegrityError(
                f"{where}: {problems[0]} of the shape {list(shape)} its pieces span (pieces in {files_of}: a rank file is missing, or a piece's "
                "saved_offsets are wrong)",
                url=where,
            )
        tensors.append(_Tensor(name, dtypes[name][0], shape, tuple(pieces)))
    return tensors


def _index(location: Location, rel: str) -> tuple[dict[str, str], int | None]:
    """The consolidated index: ``weight_map`` (tensor -> file beside it) and ``metadata.total_size``."""
    url = location.url_of(rel)
    try:
        raw = json.loads(location.read_bytes(rel))
    except ValueError:
        raw = None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for k, v in weight_map.items()
    ):
        raise IntegrityError(f"{url}: not a shard index (no weight_map of file names)", url=url)
    meta = raw.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    return weight_map, total if type(total) is int else None


def _chunked(location: Location, tensor: _Tensor) -> TensorSource:
    chunks = tuple(Chunk(p.offsets, p.sizes, Range(p.rel, *p.span)) for p in tensor.pieces if all(p.sizes))
    return TensorSource(location, tensor.name, tensor.dtype, tensor.shape, chunks=chunks)


def plan_dcp_hf(location: Location, folder: str) -> TensorPlan:
    """The model weights of the HF-writer save whose shard files are in ``folder`` of ``location``
    (``find_dcp_hf_folder``), every completeness check done before anything is written; dtypes as stored."""
    files = {e.path: e for e in location.walk() if e.type == "file"}
    named = _shard_files(location, folder, files)
    pieces = {t.name: t for t in _read_pieces(location, named, files)}
    step = posixpath.dirname(folder) if posixpath.basename(folder) == SHARDED_DIR else None
    warnings: list[str] = []
    consolidated: dict[str, TensorSource] = {}
    if step is not None and (index_rel := posixpath.join(step, INDEX)) in files:
        index_url = location.url_of(index_rel)
        weight_map, total = _index(location, index_rel)
        absent = next((n for n in weight_map if n not in pieces), None)
        if absent is not None:
            raise IntegrityError(
                f"{index_url} names tensor {absent!r}, which no file in {SHARDED_DIR}/ holds (a rank file is missing)",
                url=index_url,
            )
        present = sorted(f for f in set(weight_map.values()) if posixpath.join(step, f) in files)
        missing = sorted(set(weight_map.values()) - set(present))
        for shard in present:
            rel = posixpath.join(step, shard)
            for name, source in open_file(location, rel, files[rel].size).items():
                ours = pieces.get(name)
                if weight_map.get(name) != shard or ours is None:
                    continue
                if (source.dtype, source.shape) != (ours.dtype, ours.shape):
                    raise IntegrityError(
                        f"{location.url_of(rel)}: tensor {name!r} is {source.dtype} {list(source.shape)} there, its "
                        f"pieces in {SHARDED_DIR}/ make {ours.dtype} {list(ours.shape)} (a rank file of "
                        f"{SHARDED_DIR}/ is missing, or the two are from different saves)",
                        url=location.url_of(rel),
                    )
                consolidated[name] = source
        lost = next((n for n, f in weight_map.items() if f in present and n not in consolidated), None)
        if lost is not None:
            raise IntegrityError(f"{index_url}: tensor {lost!r} is not in {weight_map[lost]}", url=index_url)
        if total is not None:
            size = sum(nbytes_of(pieces[n].dtype, pieces[n].shape) for n in weight_map)
            if size != total:
                raise IntegrityError(
                    f"{index_url}: total_size is {total} bytes, the pieces in {SHARDED_DIR}/ make {size} (a rank file "
                    "is missing)",
                    url=index_url,
                )
        else:
            _every_rank_has_every_index(location, folder, named)
        if missing:
            consolidated = {}
            warnings.append(
                f"read the pieces in {SHARDED_DIR}/: {missing[0]} named by {INDEX} is missing, so the consolidated "
                "files are incomplete (pieces checked against the index)"
            )
        else:
            warnings.append(
                f"read the consolidated {', '.join(present[:2])}{'...' if len(present) > 2 else ''} "
                f"({INDEX} and every file it names are there, checked against the pieces in {SHARDED_DIR}/; "
                f"{SHARDED_DIR}/ is the writer's by-product)"
            )
        extra = [n for n in pieces if n not in weight_map]
        if extra:
            warnings.append(
                f"{len(extra)} tensor(s) of {SHARDED_DIR}/ are not in {INDEX} (torch's consolidator leaves such "
                f"tensors out): read from their pieces, e.g. {extra[0]}"
            )
    else:
        _every_rank_has_every_index(location, folder, named)
        warnings.append(
            f"no {INDEX} beside the shard files: completeness checked from the pieces alone (a missing last "
            "rank that leaves no gap cannot be seen)"
        )
    subtree = model_subtree(pieces)
    cut = len(subtree) + 1 if subtree else 0
    tensors = []
    for name, tensor in pieces.items():
        if subtree and not name.startswith(subtree + "."):
            continue
        source = consolidated.get(name) or _chunked(location, tensor)
        tensors.append(
            TensorSource(
                source.location, name[cut:], source.dtype, source.shape, source.ranges, source.chunks
            )
        )
    ranks = {r for r, _ in named}
    if subtree:
        warnings.append(
            f"wrote the {subtree!r} sub-tree; {len(pieces) - len(tensors)} other tensor(s) left out"
        )
    return TensorPlan(
        step or (folder if step is None else "") or posixpath.basename(location.root),
        "dcp-hf",
        tensors,
        world_size=max(ranks),
        warnings=warnings,
        dropped=len(pieces) - len(tensors),
    )


def _every_rank_has_every_index(location: Location, folder: str, named: dict[tuple[int, int], str]) -> None:
    """Without a ``total_size`` to check against, a rank lacking a file for an output index that other ranks
    wrote is taken as that file lost (its tensors would come out short with no gap to show it)."""
    indices = sorted({i for _, i in named})
    count = SHARD_FILE.match(posixpath.basename(next(iter(named.values()))))
    total = int(count.group(3)) if count else len(indices)
    for rank in sorted({r for r, _ in named}):
        for index in indices:
            if (rank, index) not in named:
                other = posixpath.basename(named[next(k for k in sorted(named) if k[0] == rank)])
                rel = posixpath.join(folder, _shard_name(rank, index, total))
                raise IntegrityError(
                    f"{location.url_of(rel)} is missing: rank {rank} wrote {other}, and every rank writes a file "
                    f"for each output index (its tensors would come out short)",
                    url=location.url_of(rel),
                )
