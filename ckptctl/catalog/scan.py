"""Turn one listing walk of a run into its checkpoint units, pointers, metrics and warnings.

Costs on an object store: one recursive listing, one small GET per pointer file, one GET for the newest
``trainer_state.json``, and one small ranged GET per single-file checkpoint (its structural check); a
Lightning ``.ckpt`` costs two or three more (its pickle and its score tensors: the step of ``last.ckpt`` and
the monitored value of files whose names carry none). Nothing is read per folder unit. A scan collects
problems as warnings instead of stopping at the first one.

``read_units=False`` (``ckptctl runs`` over a root of a thousand runs) makes it one listing plus the pointer files
and an unfinished prune's journal: no read per checkpoint, so single-file checkpoints are judged by the listing
alone (an empty file is incomplete, any other ``unknown``) and no metric is read.
"""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ckptctl.catalog.journal import JOURNAL_NAME, decode_journal
from ckptctl.catalog.layouts import (
    POINTER_FILE_NAMES,
    UNFINISHED_SUFFIX,
    ZIP_SUFFIXES,
    NameMatch,
    Verdict,
    is_auxiliary_dir,
    is_auxiliary_file,
    is_orbax_step_dir,
    judge_dir,
    match_dir_contents,
    match_dir_name,
    match_file_name,
)
from ckptctl.catalog.metrics import TrainerStateError, metrics_from_name, parse_trainer_state
from ckptctl.catalog.model import Layout, Pointer, RunScan, Status, Unit, UnitFile
from ckptctl.errors import CkptctlError, NothingRecognisedError
from ckptctl.formats.lightning import read_lightning_meta
from ckptctl.formats.quick_check import quick_check_file
from ckptctl.formats.source import FileSource
from ckptctl.storage.location import POINTER_FILE_LIMIT, FileEntry, Location

DEFAULT_SETTLE_SECONDS = 600.0
_TRACKER = "latest_checkpointed_iteration.txt"
# A long run's trainer_state.json (a log entry per logging step) is megabytes; nothing real is near this.
TRAINER_STATE_LIMIT = 128 * 1024 * 1024


@dataclass
class _Candidate:
    path: str
    kind: str  # "dir" | "file"
    match: NameMatch | None  # None: unknown
    files: list[FileEntry] = field(default_factory=list)


class _Tree:
    """The walk, indexed by parent folder."""

    def __init__(self, entries: Iterable[FileEntry]) -> None:
        self.by_path: dict[str, FileEntry] = {}
        self.children: dict[str, list[FileEntry]] = {}
        for entry in entries:
            self.by_path[entry.path] = entry
            self.children.setdefault(entry.parent, []).append(entry)
        # Object stores have no folders: make sure every parent of a file is known as a folder.
        for path in list(self.children):
            while path and path not in self.by_path:
                self.by_path[path] = FileEntry(path, "directory", 0, None)
                self.children.setdefault(posixpath.dirname(path), []).append(self.by_path[path])
                path = posixpath.dirname(path)

    def child_names(self, path: str) -> set[str]:
        return {c.name for c in self.children.get(path, [])}


def _find_candidates(tree: _Tree, container: str) -> list[_Candidate]:
    """Units directly or indirectly inside ``container``; unrecognised entries become unknown candidates."""
    kids = sorted(tree.children.get(container, []), key=lambda e: e.path)
    matched: dict[str, NameMatch] = {}
    for entry in kids:
        if entry.type == "directory":
            found = match_dir_name(entry.name) or match_dir_contents(entry.name, tree.child_names(entry.path))
        elif entry.type == "file":
            found = match_file_name(entry.name)
        else:
            found = None
        if found:
            matched[entry.path] = found
    layouts = {m.layout for m in matched.values()}
    candidates: list[_Candidate] = []
    for entry in kids:
        if entry.path in matched:
            candidates.append(
                _Candidate(entry.path, "dir" if entry.type == "directory" else "file", matched[entry.path])
            )
            continue
        if entry.type == "directory":
            orbax = is_orbax_step_dir(entry.name, layouts)
            if orbax:
                candidates.append(_Candidate(entry.path, "dir", orbax))
                continue
            inner = _find_candidates(tree, entry.path)
            if any(c.match for c in inner):
                candidates.extend(inner)
            elif not is_auxiliary_dir(entry.name) and inner:
                candidates.append(_Candidate(entry.path, "dir", None))
        elif entry.type == "file" and not is_auxiliary_file(entry.name):
            candidates.append(_Candidate(entry.path, "file", None))
    return candidates


def _assign_files(tree: _Tree, candidates: list[_Candidate]) -> None:
    by_path = {c.path: c for c in candidates}
    for entry in tree.by_path.values():
        if entry.type != "file":
            continue
        path = entry.path
        while True:
            owner = by_path.get(path)
            if owner is not None:
                owner.files.append(entry)
                break
            if not path:
                break
            path = posixpath.dirname(path)


@dataclass
class _Draft:
    """A unit while the scan is still deciding its status."""

    candidate: _Candidate
    layout: Layout
    step: int | None
    verdict: Verdict
    pointers: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    metric_source: str | None = None
    marker_checked: bool = False
    journaled: bool = False
    source: FileSource | None = None
    """A single file's reads so far (its structural check), so a second reader of it asks for no byte twice."""

    @property
    def path(self) -> str:
        return self.candidate.path

    @property
    def container(self) -> str:
        return posixpath.dirname(self.path)


def _judge(
    location: Location, tree: _Tree, candidate: _Candidate, warnings: list[str], *, read: bool = True
) -> _Draft:
    match = candidate.match
    if match is None:
        what = "folder" if candidate.kind == "dir" else "file"
        return _Draft(candidate, Layout.UNKNOWN, None, Verdict(Status.UNKNOWN, f"unrecognised {what}"))
    if match.in_progress_reason:
        return _Draft(
            candidate, match.layout, match.step, Verdict(Status.IN_PROGRESS, match.in_progress_reason)
        )
    name = posixpath.basename(candidate.path)
    if (
        posixpath.join(posixpath.dirname(candidate.path), f"{name}{UNFINISHED_SUFFIX}").lstrip("/")
        in tree.by_path
    ):
        return _Draft(
            candidate, match.layout, match.step, Verdict(Status.IN_PROGRESS, "-unfinished marker present")
        )
    if candidate.kind == "dir":
        prefix = f"{candidate.path}/" if candidate.path else ""
        rel_files = {f.path[len(prefix) :] for f in candidate.files}
        empty = frozenset(f.path[len(prefix) :] for f in candidate.files if f.size == 0)
        return _Draft(candidate, match.layout, match.step, judge_dir(match.layout, rel_files, name, empty))
    entry = candidate.files[0]
    if not read:
        verdict = (
            Verdict(Status.INCOMPLETE, "empty file")
            if entry.size == 0
            else Verdict(Status.UNKNOWN, "not opened (listing-only scan; `ckptctl list` checks it)")
        )
        return _Draft(candidate, match.layout, match.step, verdict)
    if not entry.path.endswith((*ZIP_SUFFIXES, ".safetensors")):
        return _Draft(
            candidate,
            match.layout,
            match.step,
            Verdict(Status.UNKNOWN, "no structural check for this format"),
        )
    source = FileSource(location, entry.path, entry.size)
    try:
        check = quick_check_file(location, entry.path, entry.size, source=source)
    except CkptctlError as exc:
        warnings.append(f"{entry.path}: could not read it to check it: {exc}")
        return _Draft(candidate, match.layout, match.step, Verdict(Status.UNKNOWN, "could not be read"))
    status = Status.COMPLETE if check.ok else Status.INCOMPLETE if check.ok is False else Status.UNKNOWN
    return _Draft(candidate, match.layout, match.step, Verdict(status, check.reason), source=source)


def _read_text(location: Location, rel: str, warnings: list[str]) -> str | None:
    """A pointer file's text, or None (with a warning) when it cannot be read or is not short text."""
    try:
        data = location.read_bytes(rel, max_bytes=POINTER_FILE_LIMIT)
    except CkptctlError as exc:
        warnings.append(f"{rel}: could not read pointer file: {exc}")
        return None
    text = data.decode("utf-8", errors="replace").strip()
    if len(text) > 256 or not text.isprintable():
        warnings.append(
            f"{rel}: not a pointer (expected a short line of text, found {len(data)} bytes of data)"
        )
        return None
    return text


def _apply_step_pointer(
    drafts: list[_Draft], pointer: Pointer, layout: Layout, pointed_step: int | None, label: str
) -> None:
    """DeepSpeed ``latest`` and Megatron's tracker: the named unit and older ones of the same family in the
    same folder are committed; newer ones may still be in flight."""
    for draft in drafts:
        if draft.layout is not layout or draft.container != posixpath.dirname(pointer.source):
            continue
        if draft.verdict.status is Status.INCOMPLETE:
            continue
        if draft.path == pointer.target:
            draft.verdict = Verdict(Status.COMPLETE, f"named by {label}")
        elif pointed_step is not None and draft.step is not None and draft.step > pointed_step:
            draft.verdict = Verdict(
                Status.IN_PROGRESS, f"newer than {label} ({posixpath.basename(pointer.target)})"
            )
        elif pointed_step is not None and draft.step is not None and draft.verdict.status is Status.UNKNOWN:
            draft.verdict = Verdict(
                Status.COMPLETE, f"older than {label} ({posixpath.basename(pointer.target)})"
            )


def sibling_named(source: str, text: str) -> str:
    """The run path a ``latest``-style file at ``source`` names by ``text``: a tag folder beside it."""
    parent = posixpath.dirname(source)
    return posixpath.join(parent, text) if parent else text


def _pointers(location: Location, tree: _Tree, drafts: list[_Draft], warnings: list[str]) -> list[Pointer]:
    unit_paths = {d.path for d in drafts}
    by_path = {d.path: d for d in drafts}

    def owning_unit(path: str) -> str | None:
        if path.startswith(("/", "../")) or path == "..":
            return None  # a link out of the run (the walk gives inside targets relative to the run)
        while path:
            if path in unit_paths:
                return path
            path = posixpath.dirname(path)
        return "" if "" in unit_paths else None

    pointers: list[Pointer] = []
    for entry in sorted(tree.by_path.values(), key=lambda e: e.path):
        inside = owning_unit(entry.parent) if entry.parent else ("" if "" in unit_paths else None)
        if entry.type == "link" and entry.path not in unit_paths:
            target = entry.link_target or ""
            owner = owning_unit(target) if target else None
            if owner is None:
                warnings.append(f"{entry.path}: link to {target!r}, which is not a checkpoint of this run")
                continue
            pointers.append(Pointer(entry.name, entry.path, owner))
            continue
        if entry.type != "file" or entry.name not in POINTER_FILE_NAMES or inside is not None:
            continue
        text = _read_text(location, entry.path, warnings)
        if text is None:
            continue
        if entry.name == _TRACKER:
            megatron = [d for d in drafts if d.layout is Layout.MEGATRON and d.container == entry.parent]
            step = int(text) if text.isdigit() else None
            named = next(
                (
                    d
                    for d in megatron
                    if (text == "release" and posixpath.basename(d.path) == "release")
                    or (step is not None and d.step == step)
                ),
                None,
            )
            if named is None:
                warnings.append(f"{entry.path} names iteration {text!r}, which is not in the run")
                continue
            pointer = Pointer("tracker", entry.path, named.path)
            _apply_step_pointer(drafts, pointer, Layout.MEGATRON, step, "tracker")
        else:
            target = sibling_named(entry.path, text)
            named_draft = by_path.get(target)
            if named_draft is None or not text or "/" in text:
                warnings.append(f"{entry.path} names {text!r}, which is not in the run")
                continue
            pointer = Pointer(entry.name, entry.path, target)
            _apply_step_pointer(drafts, pointer, Layout.DEEPSPEED, named_draft.step, entry.name)
        pointers.append(pointer)
    for draft in drafts:
        match = draft.candidate.match
        if (draft.layout is Layout.NEMO and re.search(r"-last$", draft.path)) or (match and match.last_copy):
            pointers.append(Pointer("last", draft.path, draft.path))
    return pointers


def _hf_metrics(location: Location, drafts: list[_Draft], warnings: list[str]) -> Pointer | None:
    """Read the newest complete HF unit's trainer_state.json (it holds the whole log history) and attach each
    unit's values at exactly its step. Returns the ``best_model_checkpoint`` pointer when it resolves."""
    hf = [d for d in drafts if d.layout is Layout.HF_TRAINER and d.step is not None]
    newest_first = sorted(
        (d for d in hf if d.verdict.status is Status.COMPLETE), key=lambda d: d.step or 0, reverse=True
    )
    for draft in newest_first[:3]:
        rel = f"{draft.path}/trainer_state.json" if draft.path else "trainer_state.json"
        try:
            state = parse_trainer_state(location.read_bytes(rel, max_bytes=TRAINER_STATE_LIMIT))
        except TrainerStateError as exc:
            draft.verdict = trainer_state_verdict(exc)
            warnings.append(f"{rel}: {exc}; using an older trainer_state.json for metrics")
            continue
        except CkptctlError as exc:
            warnings.append(f"{rel}: unreadable ({exc}); trying an older one")
            continue
        draft.marker_checked = True
        for unit in hf:
            values = state.by_step.get(unit.step or -1)
            if values:
                unit.metrics.update(values)
                unit.metric_source = rel
        if state.best_model_checkpoint:
            best_name = state.best_model_checkpoint.rstrip("/").rsplit("/", 1)[-1]
            best = next((d for d in hf if posixpath.basename(d.path) == best_name), None)
            if best is None:
                warnings.append(f"{rel}: best_model_checkpoint {best_name} is not in the run")
                return None
            return Pointer("best", rel, best.path)
        return None
    return None


def trainer_state_verdict(exc: TrainerStateError) -> Verdict:
    """A checkpoint whose trainer_state.json does not parse is incomplete (HF writes it last, with no rename);
    one of another shape is not ours to judge."""
    if exc.truncated:
        return Verdict(Status.INCOMPLETE, f"trainer_state.json: {exc}")
    return Verdict(Status.UNKNOWN, f"trainer_state.json is not HF Trainer's ({exc})")


def _lightning_meta(location: Location, drafts: list[_Draft], warnings: list[str]) -> None:
    """What each whole Lightning file says about itself: the step of a regular-file ``last.ckpt`` (a copy of
    the newest state) and the monitored value ``ModelCheckpoint`` recorded for the save (``current_score``),
    which Lightning's top-k ranks by, for names that carry no metric."""
    for draft in drafts:
        match = draft.candidate.match
        if draft.layout is not Layout.LIGHTNING or draft.candidate.kind != "file" or match is None:
            continue
        if draft.verdict.status is not Status.COMPLETE:
            continue
        if draft.metrics and not match.last_copy:
            continue  # its name carries the metric already: no read for what is known
        entry = draft.candidate.files[0]
        try:
            meta = read_lightning_meta(draft.source or FileSource(location, entry.path, entry.size))
        except CkptctlError as exc:
            warnings.append(f"{entry.path}: its Lightning state could not be read ({exc.message})")
            continue
        if match.last_copy:
            # Its score is the last top-k candidate's, not this state's: a step, no metric.
            draft.step = meta.global_step if draft.step is None else draft.step
            continue
        if meta.monitor and meta.current_score is not None and meta.monitor not in draft.metrics:
            draft.metrics[meta.monitor] = meta.current_score
            draft.metric_source = "ckpt"


def _apply_journal(location: Location, tree: _Tree, drafts: list[_Draft], warnings: list[str]) -> None:
    """Units named by an unfinished prune's journal are half-deleted: never complete, never counted."""
    if JOURNAL_NAME not in tree.by_path:
        return
    try:
        doomed = decode_journal(location.read_bytes(JOURNAL_NAME))
    except (CkptctlError, ValueError) as exc:
        warnings.append(f"{JOURNAL_NAME}: unreadable ({exc}); units it names cannot be told apart")
        return
    for draft in drafts:
        if draft.path in doomed:
            draft.journaled = True
            draft.verdict = Verdict(
                Status.INCOMPLETE, "being deleted (an interrupted prune's journal names it)"
            )


def _settle(draft: _Draft, newest: float | None, now: float, settle: float) -> None:
    if draft.layout is Layout.UNKNOWN or newest is None or settle <= 0:
        return
    age = now - newest
    if age < settle and draft.verdict.status is not Status.IN_PROGRESS:
        draft.verdict = Verdict(
            Status.IN_PROGRESS,
            f"settling: newest file {max(age, 0):.0f}s old (< {settle:.0f}s); was {draft.verdict.reason}",
        )


def scan_run(
    location: Location,
    *,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    now: float | None = None,
    require_units: bool = True,
    entries: Iterable[FileEntry] | None = None,
    read_units: bool = True,
) -> RunScan:
    """Catalog a run: every checkpoint unit with its layout, step, status and reason, pointers and metrics.

    ``entries`` is a listing of the run the caller already made (tier's remote view), to save a second walk.
    ``read_units=False`` reads no file per checkpoint (see the module docstring): for surveys of many runs.
    Raises NotFoundError (and subclasses) when the run is missing or a file, and NothingRecognisedError when
    ``require_units`` is set and no entry matches any known layout.
    """
    now = time.time() if now is None else now
    entries = location.walk() if entries is None else list(entries)
    tree = _Tree(entries)
    warnings: list[str] = []
    # A checkpoint folder given as the run (``ckptctl list run/checkpoint-300``) is one unit: by its name, or
    # by its markers when nothing inside it is a unit of its own.
    root_name = posixpath.basename(location.root.rstrip("/"))
    itself = match_dir_name(root_name)
    candidates = [_Candidate("", "dir", itself)] if itself else _find_candidates(tree, "")
    if not any(c.match for c in candidates):
        itself = match_dir_contents(root_name, tree.child_names(""))
        if itself:
            candidates = [_Candidate("", "dir", itself)]
    _assign_files(tree, candidates)
    drafts = [_judge(location, tree, c, warnings, read=read_units) for c in candidates]
    _apply_journal(location, tree, drafts, warnings)
    pointers = _pointers(location, tree, drafts, warnings)
    best = _hf_metrics(location, drafts, warnings) if read_units else None
    if best is not None:
        pointers.append(best)
    for draft in drafts:
        if draft.layout is not Layout.HF_TRAINER:
            named = metrics_from_name(posixpath.basename(draft.path))
            if named:
                draft.metrics.update(named)
                draft.metric_source = "name"
    if read_units:
        _lightning_meta(location, drafts, warnings)
    names_by_target: dict[str, list[str]] = {}
    for pointer in pointers:
        names_by_target.setdefault(pointer.target, []).append(pointer.name)
    units: list[Unit] = []
    for draft in drafts:
        match = draft.candidate.match
        files = tuple(UnitFile(f.path, f.size, f.mtime, f.etag) for f in draft.candidate.files)
        mtimes = [f.mtime for f in files if f.mtime is not None]
        newest = max(mtimes) if mtimes else None
        _settle(draft, newest, now, settle_seconds)
        units.append(
            Unit(
                path=draft.path,
                kind=draft.candidate.kind,
                layout=draft.layout,
                step=draft.step,
                epoch=match.epoch if match else None,
                status=draft.verdict.status,
                reason=draft.verdict.reason,
                files=files,
                total_bytes=sum(f.size for f in files),
                newest_mtime=newest,
                pointers=tuple(sorted(set(names_by_target.get(draft.path, [])))),
                metrics=dict(draft.metrics),
                metric_source=draft.metric_source,
                ordinal=match.ordinal if match else "step",
                counted=not (match and match.last_copy),
                marker_checked=draft.marker_checked,
                journaled=draft.journaled,
            )
        )
    units.sort(key=lambda u: (u.step is None, u.step if u.step is not None else 0, u.epoch or 0, u.path))
    scan = RunScan(
        url=location.url,
        units=tuple(units),
        pointers=tuple(pointers),
        warnings=tuple(warnings),
        scanned_at=now,
        file_count=sum(1 for e in entries if e.type == "file"),
    )
    if require_units and not scan.recognised:
        unknown = ", ".join(u.path for u in scan.units[:3]) or "it is empty"
        more = f" and {len(scan.units) - 3} more" if len(scan.units) > 3 else ""
        raise NothingRecognisedError(
            f"no checkpoints recognised in {location.url} ({unknown}{more})",
            url=location.url,
            hint="ckptctl recognises HF Trainer, DeepSpeed, DCP/torchtitan, Lightning, Megatron, Orbax, "
            "OLMo-core, NeMo, open-instruct and single .pt/.safetensors files",
        )
    return scan
