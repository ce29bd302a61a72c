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
header read per file; no torch. ``inspect`` gets the same checks with every problem listed
(``inspect_dcp_hf``), the catalog the ones names allow (``judge_names``: a listing, no read).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from ckptctl.errors import IntegrityError, NotFoundError, TruncatedError
from ckptctl.formats.dcp import chunk_defects
from ckptctl.formats.model import Defect, FileFact, Inspection, TensorInfo, checked_shape, nbytes_of
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import FileSource
from ckptctl.formats.tensor_layout import Chunk, Range, TensorPlan, TensorSource
from ckptctl.formats.torch_state import model_subtree, open_file, refuse_defects
from ckptctl.storage.location import FileEntry, Location

SHARDED_DIR = "sharded"
INDEX = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"^shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors$")
SHARDING_INFO = "DCP_SHARDING_INFO"
FORMAT = "dcp-hf"


def _shard_name(rank: int, index: int, count: int) -> str:
    return f"shard-{rank:05d}-model-{index:05d}-of-{count:05d}.safetensors"


def _shard_folders(paths: Iterable[str]) -> set[str]:
    return {path.rpartition("/")[0] for path in paths if SHARD_FILE.match(path.rpartition("/")[2])}


def _own_folder(found: Collection[str]) -> str | None:
    return next((f for f in ("", SHARDED_DIR) if f in found), None)


def shard_folder(paths: Iterable[str]) -> str | None:
    """Where the shard files are when ``paths`` (relative to one folder) are a single HF-writer save: ``""``
    (the folder is ``sharded/`` itself), ``sharded`` (it is the step folder holding it), else None."""
    return _own_folder(_shard_folders(paths))


def find_dcp_hf_folder(entries: Sequence[FileEntry], tag: str | None) -> str | None:
    """The folder (relative) of an HF-writer save's shard files among ``entries``: the top level (SRC is
    ``sharded/``), ``sharded`` (SRC is torchtitan's ``step-N/``), ``<tag>/sharded``, or the only
    ``<step>/sharded`` of a run folder. None when nothing here is one; NotFoundError when several are and no
    ``tag`` says which."""
    found = _shard_folders(e.path for e in entries if e.type == "file")
    if tag is not None:
        return next((f for f in (f"{tag}/{SHARDED_DIR}", tag) if f in found), None)
    own = _own_folder(found)
    if own is not None:
        return own
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


def rank_piece_note(name: str, metadata: dict[str, str]) -> str | None:
    """What ``inspect`` says of one shard file on its own: its tensors are one rank's pieces (their shapes are not
    the model's), and the folder is what to inspect."""
    if SHARD_FILE.match(name) and SHARDING_INFO in metadata:
        return "one rank's pieces of a DCP HF-writer save (shapes are the pieces'): inspect its folder for the tensors"
    return None


@dataclass(frozen=True)
class ShardSet:
    """The shard files of one HF-writer save by (rank, output index), and what their names alone show.

    ``gaps`` always mean files are lost (numbers that skip, a file of zero bytes). ``uneven`` are ranks without
    a file for an output index that other ranks wrote: taken as that file lost unless the index's
    ``total_size`` proves the tensors whole (FSDP and TP ranks hold a piece, maybe empty, of every sharded
    tensor, but a replicated tensor is written by one rank only)."""

    folder: str
    files: dict[tuple[int, int], str]
    """(rank, output index) -> the shard file, relative to the location."""
    count: int
    """N of ``-of-N``: the number of output files."""
    gaps: tuple[Defect, ...]
    uneven: tuple[Defect, ...]

    @property
    def ranks(self) -> list[int]:
        return sorted({r for r, _ in self.files})


def shard_set(folder: str, paths: Iterable[str], empty: Collection[str] = ()) -> ShardSet:
    """The shard files directly in ``folder`` among ``paths`` (relative to one location), checked by name only:
    one ``-of-N`` for all, output indices 1..N each written by some rank, ranks 1..R without a skip, none of the
    ``empty`` (zero-byte) files, and each rank with a file for every index (``uneven``). Costs nothing: the
    catalog judges a listing with it, the readers before opening a file."""
    base = f"{folder}/" if folder else ""
    files: dict[tuple[int, int], str] = {}
    counts: dict[int, str] = {}
    gaps: list[Defect] = []
    for path in sorted(paths):
        name = path[len(base) :]
        match = SHARD_FILE.match(name) if path.startswith(base) and "/" not in name else None
        if match is None:
            continue
        rank, index, count = (int(g) for g in match.groups())
        counts.setdefault(count, name)
        if not 1 <= index <= count:
            gaps.append(Defect(path, f"output index {index} is not in 1..{count}"))
            continue
        if path in empty:
            gaps.append(Defect(path, "0 bytes (the save was cut off writing it)", truncated=True))
        files[(rank, index)] = path
    if len(counts) != 1:
        shown = " and ".join(f"-of-{c:05d} ({n})" for c, n in sorted(counts.items())[:2])
        if counts:
            gaps.append(Defect(folder, f"shard files disagree on the number of output files: {shown}"))
        return ShardSet(folder, files, max(counts, default=0), tuple(gaps), ())
    count = next(iter(counts))
    ranks = sorted({r for r, _ in files})
    indices = sorted({i for _, i in files})
    for index in range(1, count + 1):
        if index not in indices:
            gaps.append(
                Defect(
                    folder,
                    f"no shard-*-model-{index:05d}-of-{count:05d}.safetensors: output file {index} of {count} has "
                    "no rank's pieces (rank files are missing)",
                )
            )
    for rank in range(1, max(ranks, default=0) + 1):
        if rank not in ranks:
            gaps.append(
                Defect(
                    folder,
                    f"no shard-{rank:05d}-model-*-of-{count:05d}.safetensors: rank {rank} is missing (ranks are "
                    f"numbered from 1; found {', '.join(map(str, ranks))})",
                )
            )
    uneven = []
    for rank in ranks:
        wrote = posixpath.basename(files[next(k for k in sorted(files) if k[0] == rank)])
        for index in indices:
            if (rank, index) not in files:
                uneven.append(
                    Defect(
                        folder,
                        f"{_shard_name(rank, index, count)} is missing: rank {rank} wrote {wrote}, and every rank "
                        "writes one per output index (its tensors would come out short)",
                    )
                )
    return ShardSet(folder, files, count, tuple(gaps), tuple(uneven))


def judge_names(paths: Collection[str], empty: Collection[str] = ()) -> tuple[bool, str] | None:
    """What a listing alone says of the HF-writer save in a step folder (``paths`` relative to it): None when
    there is none; else whether its shard set is whole, and why. The readers' name checks (``shard_set``), with
    ``uneven`` counted only when no ``model.safetensors.index.json`` is beside ``sharded/``, as the plan does
    (with one, its ``total_size`` decides, which takes a read). A missing last rank leaves no gap in names."""
    folder = shard_folder(paths)
    if folder is None:
        return None
    shards = shard_set(folder, paths, empty)
    indexed = folder == SHARDED_DIR and INDEX in paths
    problems = shards.gaps if indexed else (*shards.gaps, *shards.uneven)
    if problems:
        first = problems[0]
        return False, f"DCP HF-writer save: {first.message if first.file == folder else first}"
    said = (
        f"{INDEX} beside {SHARDED_DIR}/ (the consolidation finished)"
        if indexed
        else f"no {INDEX}: a missing last rank would leave no gap"
    )
    return True, (
        f"DCP HF-writer save: ranks 1..{shards.ranks[-1]} wrote all {shards.count} output file(s); {said}"
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


def _defect_of(location: Location, rel: str, exc: IntegrityError) -> Defect:
    """A reader's error about one file as a defect of it (the file's name or URL taken off the front)."""
    message = exc.message
    for lead in (f"{location.url_of(rel)}: ", f"{posixpath.basename(rel)}: "):
        message = message.removeprefix(lead)
    return Defect(rel, message, truncated=isinstance(exc, TruncatedError))


def _refuse(location: Location, problems: list[Defect] | tuple[Defect, ...]) -> None:
    """The first problem as the error, naming its file (``inspect`` lists them all)."""
    if problems:
        refuse_defects(location, problems[0].file, problems)


def _file_pieces(
    location: Location, rel: str, size: int
) -> tuple[list[tuple[str, str, _Piece]], list[Defect]]:
    """(name, dtype, piece) of every tensor of one shard file, from its header and ``DCP_SHARDING_INFO``; a file
    whose header shows it damaged gives no pieces."""
    try:
        header = read_safetensors_header(FileSource(location, rel, size))
    except IntegrityError as exc:
        return [], [_defect_of(location, rel, exc)]
    if header.defects:
        return [], [Defect(rel, d.message, d.truncated) for d in header.defects]
    try:
        info = json.loads(header.metadata[SHARDING_INFO])
    except (KeyError, ValueError):
        info = None
    if not isinstance(info, dict):
        return [], [Defect(rel, f"no {SHARDING_INFO} metadata: not written by DCP's HF writer")]
    found: list[tuple[str, str, _Piece]] = []
    problems: list[Defect] = []
    for tensor in header.tensors:
        entry = info.get(tensor.name)
        raw = entry.get("saved_offsets") if isinstance(entry, dict) else None
        what = f"tensor {tensor.name!r}: saved_offsets"
        if raw is None:
            problems.append(Defect(rel, f"{what} missing from {SHARDING_INFO}"))
            continue
        try:
            offsets = checked_shape(raw, what)
        except IntegrityError as exc:
            problems.append(Defect(rel, exc.message))
            continue
        if len(offsets) != len(tensor.shape):
            problems.append(
                Defect(rel, f"{what} {list(offsets)} do not match its shape {list(tensor.shape)}")
            )
            continue
        found.append(
            (tensor.name, tensor.dtype, _Piece(rel, offsets, tensor.shape, header.spans[tensor.name]))
        )
    return found, problems


def _read_pieces(
    location: Location, shards: ShardSet, files: dict[str, FileEntry]
) -> tuple[dict[str, _Tensor], list[Defect]]:
    """Every tensor from its pieces, its dtype the same in all, its shape the farthest piece end in each
    dimension, the pieces tiling that shape (formats/dcp.py's check); every problem collected, in file order."""
    found: dict[str, list[_Piece]] = {}
    dtypes: dict[str, tuple[str, str]] = {}
    problems: list[Defect] = []
    for key in sorted(shards.files):
        rel = shards.files[key]
        read, wrong = _file_pieces(location, rel, files[rel].size)
        problems += wrong
        for name, dtype, piece in read:
            known = dtypes.setdefault(name, (dtype, rel))
            if known[0] != dtype:
                problems.append(Defect(rel, f"tensor {name!r} is {dtype} here but {known[0]} in {known[1]}"))
                continue
            found.setdefault(name, []).append(piece)
    tensors = {}
    for name, pieces in found.items():
        ndims = {len(p.sizes) for p in pieces}
        if len(ndims) > 1:
            problems.append(
                Defect(shards.folder, f"tensor {name!r}: its pieces disagree on the number of dimensions")
            )
            continue
        shape = tuple(max(p.offsets[d] + p.sizes[d] for p in pieces) for d in range(ndims.pop()))
        tiling = chunk_defects(name, shape, [(p.offsets, p.sizes) for p in pieces], exhaustive=True)
        if tiling:
            files_of = ", ".join(sorted({posixpath.basename(p.rel) for p in pieces}))
            problems.append(
                Defect(
                    shards.folder,
                    f"{tiling[0]} of the shape {list(shape)} its pieces span (pieces in {files_of}: a rank file "
                    "is missing, or a piece's saved_offsets are wrong)",
                )
            )
        tensors[name] = _Tensor(name, dtypes[name][0], shape, tuple(pieces))
    return tensors, problems


def _index(location: Location, rel: str) -> tuple[dict[str, str], int | None] | None:
    """The consolidated index: ``weight_map`` (tensor -> file beside it) and ``metadata.total_size``; None when
    it is not a shard index."""
    try:
        raw = json.loads(location.read_bytes(rel))
    except ValueError:
        raw = None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for k, v in weight_map.items()
    ):
        return None
    meta = raw.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    return weight_map, total if type(total) is int else None


@dataclass
class _Consolidated:
    """The index beside ``sharded/`` and the files it names, checked against the pieces."""

    total: int | None
    present: list[str]
    """Files the index names that are there (relative to the step folder)."""
    missing: list[str]
    sources: dict[str, TensorSource]
    """Tensor -> its consolidated copy, whose header agrees with the pieces."""
    extra: list[str]
    """Tensors of the pieces the index does not name (torch's consolidator leaves such tensors out)."""
    problems: list[Defect] = field(default_factory=list)


def _check_index(
    location: Location, step: str, files: dict[str, FileEntry], pieces: dict[str, _Tensor]
) -> _Consolidated:
    """Every tensor the index names held by some piece, every consolidated header the dtype and shape the
    pieces make, and ``total_size`` the bytes the pieces make: shapes only shrink when pieces are lost, so an
    equal total proves none were."""
    index_rel = posixpath.join(step, INDEX)
    index = _index(location, index_rel)
    if index is None:
        return _Consolidated(
            None, [], [], {}, [], [Defect(index_rel, "not a shard index (no weight_map of file names)")]
        )
    weight_map, total = index
    present = sorted(f for f in set(weight_map.values()) if posixpath.join(step, f) in files)
    missing = sorted(set(weight_map.values()) - set(present))
    extra = [n for n in pieces if n not in weight_map]
    check = _Consolidated(total, present, missing, {}, extra)
    absent = next((n for n in weight_map if n not in pieces), None)
    if absent is not None:
        check.problems.append(
            Defect(
                index_rel,
                f"names tensor {absent!r}, which no file in {SHARDED_DIR}/ holds (a rank file is missing)",
            )
        )
    for shard in present:
        rel = posixpath.join(step, shard)
        try:
            opened = open_file(location, rel, files[rel].size)
        except IntegrityError as exc:
            check.problems.append(_defect_of(location, rel, exc))
            continue
        for name, source in opened.items():
            ours = pieces.get(name)
            if weight_map.get(name) != shard or ours is None:
                continue
            if (source.dtype, source.shape) != (ours.dtype, ours.shape):
                check.problems.append(
                    Defect(
                        rel,
                        f"tensor {name!r} is {source.dtype} {list(source.shape)} there, its pieces in "
                        f"{SHARDED_DIR}/ make {ours.dtype} {list(ours.shape)} (a rank file of {SHARDED_DIR}/ "
                        "is missing, or the two are from different saves)",
                    )
                )
                continue
            check.sources[name] = source
        lost = next((n for n, f in weight_map.items() if f == shard and n not in opened), None)
        if lost is not None:
            check.problems.append(Defect(index_rel, f"tensor {lost!r} is not in {shard}"))
    if total is not None and absent is None:
        size = sum(nbytes_of(pieces[n].dtype, pieces[n].shape) for n in weight_map)
        if size != total:
            check.problems.append(
                Defect(
                    index_rel,
                    f"total_size is {total} bytes, the pieces in {SHARDED_DIR}/ make {size} (a rank file is "
                    "missing)",
                )
            )
    return check


def _chunked(location: Location, tensor: _Tensor) -> TensorSource:
    chunks = tuple(Chunk(p.offsets, p.sizes, Range(p.rel, *p.span)) for p in tensor.pieces if all(p.sizes))
    return TensorSource(location, tensor.name, tensor.dtype, tensor.shape, chunks=chunks)


def _step_of(folder: str) -> str | None:
    """The step folder holding ``sharded/`` (where the consolidated index would be), relative."""
    return posixpath.dirname(folder) if posixpath.basename(folder) == SHARDED_DIR else None


def plan_dcp_hf(location: Location, folder: str, entries: Sequence[FileEntry] | None = None) -> TensorPlan:
    """The model weights of the HF-writer save whose shard files are in ``folder`` of ``location``
    (``find_dcp_hf_folder``), every completeness check done before anything is written; dtypes as stored.
    ``entries``: the location's listing when the caller has one (else one walk)."""
    files = {e.path: e for e in (location.walk() if entries is None else entries) if e.type == "file"}
    shards = shard_set(folder, files)
    _refuse(location, shards.gaps)
    pieces, problems = _read_pieces(location, shards, files)
    _refuse(location, problems)
    step = _step_of(folder)
    warnings: list[str] = []
    consolidated: dict[str, TensorSource] = {}
    if step is not None and posixpath.join(step, INDEX) in files:
        check = _check_index(location, step, files, pieces)
        _refuse(location, check.problems)
        if check.total is None:
            _refuse(location, shards.uneven)
        if check.missing:
            warnings.append(
                f"read the pieces in {SHARDED_DIR}/: {check.missing[0]} named by {INDEX} is missing, so the "
                "consolidated files are incomplete (pieces checked against the index)"
            )
        else:
            consolidated = check.sources
            present = check.present
            warnings.append(
                f"read the consolidated {', '.join(present[:2])}{'...' if len(present) > 2 else ''} "
                f"({INDEX} and every file it names are there, checked against the pieces in {SHARDED_DIR}/; "
                f"{SHARDED_DIR}/ is the writer's by-product)"
            )
        if check.extra:
            warnings.append(
                f"{len(check.extra)} tensor(s) of {SHARDED_DIR}/ are not in {INDEX} (torch's consolidator leaves "
                f"such tensors out): read from their pieces, e.g. {check.extra[0]}"
            )
    else:
        _refuse(location, shards.uneven)
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
    if subtree:
        warnings.append(
            f"wrote the {subtree!r} sub-tree; {len(pieces) - len(tensors)} other tensor(s) left out"
        )
    return TensorPlan(
        step or (folder if step is None else "") or posixpath.basename(location.root),
        FORMAT,
        tensors,
        world_size=max(shards.ranks),
        warnings=warnings,
        dropped=len(pieces) - len(tensors),
    )


def inspect_dcp_hf(
    location: Location, entries: Sequence[FileEntry], folder: str, *, verify: bool = False
) -> Inspection:
    """Describe the HF-writer save whose shard files are in ``folder`` (``shard_folder``): each tensor's dtype and
    global shape as its pieces make it, the ranks and output files found, and every defect consolidate would
    refuse (all of them, where it stops at the first), the index and consolidated files checked against the
    pieces when they are there. One header read per file; ``verify`` has nothing more to read here."""
    files = {e.path: e for e in entries if e.type == "file"}
    shards = shard_set(folder, files)
    pieces, problems = _read_pieces(location, shards, files)
    defects = [*shards.gaps, *problems]
    step = _step_of(folder)
    notes: list[str] = []
    facts_files = [FileFact(rel, files[rel].size, "rank") for rel in sorted(shards.files.values())]
    consolidated: list[str] = []
    indexed = step is not None and posixpath.join(step, INDEX) in files
    if step is not None and indexed:
        check = _check_index(location, step, files, pieces)
        defects += check.problems
        if check.total is None:
            defects += shards.uneven
        index_rel = posixpath.join(step, INDEX)
        consolidated = [posixpath.join(step, f) for f in check.present]
        facts_files.append(FileFact(index_rel, files[index_rel].size, "index"))
        facts_files += [FileFact(rel, files[rel].size, "weights") for rel in consolidated]
        if check.missing:
            notes.append(
                f"{check.missing[0]} named by {INDEX} is missing: the consolidated copy is incomplete "
                f"(consolidate reads the pieces in {SHARDED_DIR}/ instead)"
            )
        if check.extra:
            notes.append(
                f"{len(check.extra)} tensor(s) of {SHARDED_DIR}/ are not in {INDEX}, e.g. {check.extra[0]}"
            )
    else:
        defects += shards.uneven
        notes.append(
            f"no {INDEX} beside the shard files: completeness is checked from the pieces alone (a missing last "
            "rank that leaves no gap cannot be seen)"
        )
    listed = {f.path for f in facts_files}
    facts_files += [FileFact(p, e.size, "other") for p, e in sorted(files.items()) if p not in listed]
    tensors = tuple(
        TensorInfo(t.name, t.dtype, t.shape, nbytes_of(t.dtype, t.shape)) for t in pieces.values()
    )
    facts = {
        "dcp_hf": {
            "ranks": shards.ranks,
            "output_files": shards.count,
            "shard_files": len(shards.files),
            "pieces": sum(len(t.pieces) for t in pieces.values()),
            "sharded_tensors": sum(
                1 for t in pieces.values() if sum(1 for p in t.pieces if all(p.sizes)) > 1
            ),
            "index": indexed,
            "consolidated_files": consolidated,
        }
    }
    return Inspection(
        url=location.url,
        format=FORMAT,
        files=tuple(facts_files),
        tensors=tensors,
        facts=facts,
        defects=tuple(defects),
        notes=tuple(notes),
        verified=verify,
    )
