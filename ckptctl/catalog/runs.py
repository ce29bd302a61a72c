"""What ``ckptctl runs ROOT`` shows: every run under a root, its checkpoints by status, its bytes, and the
leftovers that cost money without being checkpoints anyone can resume from.

Cost: one listing walk of ROOT (object stores: one paginated ``find``, LIST requests only) scanned by
``scan_run(read_units=False)``, which opens no file per checkpoint (only pointer files such as DeepSpeed
``latest``, a few per run at most); on S3 one more paginated ListMultipartUploads under ROOT. Tier manifests
are counted by name, never read. Nothing under ROOT is written or deleted.

A run is the folder a checkpoint is ranked in (``Unit.run``), named without a trainer's fixed ``checkpoint/``
or ``checkpoints/`` subfolder (torchtitan, Lightning, NeMo, Accelerate), so ``exp1/checkpoint/step-3`` belongs
to run ``exp1``, where a tier push of that run writes its manifests.
"""

from __future__ import annotations

import bisect
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ckptctl.catalog.model import Layout, Status, Unit, policy_files_in
from ckptctl.catalog.scan import scan_run
from ckptctl.errors import CkptctlError, NothingRecognisedError, UsageError
from ckptctl.storage.atomic import PARTIAL_SUFFIX, TEMP_PREFIX
from ckptctl.storage.location import FileEntry, Location
from ckptctl.storage.transfer import pending_uploads
from ckptctl.tiering.manifest import MANIFEST_DIR, unit_of_manifest

LeftoverKind = Literal["stale-in-progress", "by-product", "partial", "multipart-upload"]
SORT_KEYS = ("size", "name", "age", "checkpoints")
_TRAINER_SUBFOLDERS = frozenset({"checkpoint", "checkpoints"})


@dataclass(frozen=True)
class Leftover:
    """Something under ROOT that takes storage (or, for an upload, money) and is no checkpoint to resume from."""

    kind: LeftoverKind
    path: str
    """Relative to ROOT ('/'-separated); for an upload, the key it was going to write."""
    bytes: int | None
    """None for a multipart upload: its parts are not in a listing (ListParts would cost a request each)."""
    newest_mtime: float | None
    reason: str
    in_checkpoint: bool = False
    """Its bytes are a checkpoint's too: a stale save is one, a by-product may sit inside one."""

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "bytes": self.bytes,
            "age_seconds": _age(self.newest_mtime, now),
            "reason": self.reason,
            "in_checkpoint": self.in_checkpoint,
        }


@dataclass(frozen=True)
class RunSummary:
    """One run under ROOT, as ``runs`` reports it."""

    path: str
    """Relative to ROOT; "" is ROOT itself."""
    layouts: tuple[str, ...]
    by_status: dict[str, int]
    """Checkpoints per status; every status is a key."""
    bytes: int
    """Every file in the run's folder (checkpoints, leftovers, logs, pointers), less the runs nested in it."""
    checkpoint_bytes: int
    newest_step: int | None
    """The highest step among complete checkpoints, else among unknown ones (Accelerate: a save counter)."""
    newest_mtime: float | None
    """When that checkpoint was last written."""
    tiered: int
    """Checkpoints with a tier manifest in ROOT (``<run>/.ckptctl-tier/``): counted by name, not verified."""
    leftovers: tuple[Leftover, ...] = ()
    units: tuple[Unit, ...] = ()
    """Its checkpoints as the listing-only scan saw them (paths relative to ROOT): for a policy preview."""

    @property
    def checkpoints(self) -> int:
        return sum(self.by_status.values())

    @property
    def checkpoint_folder(self) -> str:
        """The folder holding its checkpoints (``path``, or its trainer's ``checkpoints/``): the one that
        ``prune --each-run`` locks and reads policy files from."""
        return self.units[0].run if self.units else self.path

    @property
    def leftover_bytes(self) -> int:
        return sum(item.bytes or 0 for item in self.leftovers)

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "path": self.path,
            "checkpoint_folder": self.checkpoint_folder,
            "layouts": list(self.layouts),
            "checkpoints": self.checkpoints,
            "by_status": dict(self.by_status),
            "bytes": self.bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "newest_step": self.newest_step,
            "newest_age_seconds": _age(self.newest_mtime, now),
            "tiered": self.tiered,
            "leftover_bytes": self.leftover_bytes,
            "leftovers": [item.to_dict(now) for item in self.leftovers],
        }


@dataclass(frozen=True)
class RunOrder:
    """``--sort size|name|age|checkpoints`` with ``:asc`` or ``:desc`` (a bare key is ascending)."""

    key: str = "size"
    descending: bool = True

    @classmethod
    def parse(cls, text: str) -> RunOrder:
        key, _, direction = text.partition(":")
        if key not in SORT_KEYS or direction not in ("", "asc", "desc"):
            raise UsageError(
                f"--sort takes one of {', '.join(SORT_KEYS)}, optionally with :asc or :desc; got {text!r}"
            )
        return cls(key, direction == "desc")

    def sort_value(self, run: RunSummary) -> tuple[Any, ...]:
        if self.key == "size":
            return (run.bytes, run.path)
        if self.key == "checkpoints":
            return (run.checkpoints, run.path)
        if self.key == "age":
            # Youngest first when ascending; a run with no newest checkpoint counts as the oldest.
            return (-(run.newest_mtime if run.newest_mtime is not None else float("-inf")), run.path)
        return (run.path,)


@dataclass(frozen=True)
class RunsSurvey:
    """What ``runs`` found under ROOT: plain data for the table and ``--json``, in the order asked for."""

    url: str
    now: float
    settle_seconds: float
    runs: tuple[RunSummary, ...]
    outside_runs: tuple[Leftover, ...] = ()
    """Leftovers under ROOT that lie in no run's folder."""
    warnings: tuple[str, ...] = ()
    listed_files: int = 0
    policy_files: frozenset[str] = frozenset()
    """Every ``.ckptctl.toml`` the listing holds (relative to ROOT): a policy lookup needs no request more."""
    listed_bytes: int = 0
    """Every file under ROOT, in runs or not."""

    def ordered(self, order: RunOrder) -> RunsSurvey:
        runs = sorted(self.runs, key=order.sort_value, reverse=order.descending)
        return replace(self, runs=tuple(runs))

    @property
    def leftovers(self) -> tuple[Leftover, ...]:
        return tuple(item for run in self.runs for item in run.leftovers) + self.outside_runs

    @property
    def totals(self) -> dict[str, Any]:
        by_status: Counter[str] = Counter({s.value: 0 for s in Status})
        for run in self.runs:
            by_status.update(run.by_status)
        return {
            "runs": len(self.runs),
            "checkpoints": sum(by_status.values()),
            "by_status": dict(by_status),
            "bytes": self.listed_bytes,
            "tiered": sum(run.tiered for run in self.runs),
            "leftovers": len(self.leftovers),
            "leftover_bytes": sum(item.bytes or 0 for item in self.leftovers),
            "multipart_uploads": sum(1 for item in self.leftovers if item.kind == "multipart-upload"),
            "files": self.listed_files,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.url,
            "settle_seconds": self.settle_seconds,
            "runs": [run.to_dict(self.now) for run in self.runs],
            "outside_runs": [item.to_dict(self.now) for item in self.outside_runs],
            "totals": self.totals,
            "warnings": list(self.warnings),
        }


def _age(mtime: float | None, now: float) -> float | None:
    return None if mtime is None else round(now - mtime, 3)


def run_folder(container: str, containers: set[str]) -> str:
    """The run a checkpoint in ``container`` belongs to: ``container`` itself, or its parent when it is a
    trainer's fixed ``checkpoint(s)/`` subfolder and the parent holds no checkpoints of its own."""
    name = posixpath.basename(container)
    parent = posixpath.dirname(container)
    if name in _TRAINER_SUBFOLDERS and parent not in containers:
        return parent
    return container


def _owner(path: str, folders: set[str], memo: dict[str, str | None] | None = None) -> str | None:
    """The deepest run folder holding ``path`` ("" is ROOT), or None: a walk up its parents, remembered per
    parent folder in ``memo`` when given (the files of one checkpoint share the answer)."""
    parent = path.rpartition("/")[0]
    if memo is not None and parent in memo:
        return memo[parent]
    found, folder = None, path
    while folder:
        folder = folder.rpartition("/")[0]
        if folder in folders:
            found = folder
            break
    if memo is not None:
        memo[parent] = found
    return found


def _under(path: str, folders: set[str]) -> bool:
    """Whether ``path`` lies strictly inside one of ``folders``."""
    return _owner(path, folders) is not None


class _Files:
    """The listing's files in path order, so the bytes below a folder are one slice (walks are sorted)."""

    def __init__(self, entries: Iterable[FileEntry]) -> None:
        self.files = sorted((e for e in entries if e.type == "file"), key=lambda e: e.path)
        self.paths = [e.path for e in self.files]

    def below(self, folder: str) -> tuple[int, float | None]:
        """Total bytes and newest mtime of the files under ``folder``."""
        prefix = folder + "/"
        start = bisect.bisect_left(self.paths, prefix)
        end = bisect.bisect_left(self.paths, folder + "0")  # "0" sorts right after "/"
        inside = self.files[start:end]
        mtimes = [e.mtime for e in inside if e.mtime is not None]
        return sum(e.size for e in inside), max(mtimes, default=None)


def _leftover_reason(
    entry: FileEntry, children: dict[str, set[str]], units: set[str]
) -> tuple[LeftoverKind, str] | None:
    """Whether a listed entry is a conversion by-product or a ckptctl partial, and why."""
    parent, name = entry.parent, entry.name
    if name.endswith(PARTIAL_SUFFIX) or (name.startswith(TEMP_PREFIX) and entry.type == "file"):
        return (
            "partial",
            "left by an interrupted ckptctl write (pull, consolidate); re-running it resumes or removes it",
        )
    if entry.type != "directory":
        return None
    if (
        name == "sharded"
        and parent in units
        and any(n.endswith(".safetensors") for n in children.get(parent, ()))
    ):
        return "by-product", "torchtitan's DCP shards beside the consolidated safetensors files"
    if name == "tmp" and ("zero" in children.get(parent, ()) or parent.endswith("_universal")):
        return (
            "by-product",
            "ds_to_universal's temporary slices (left when it is killed or given --keep_temp_folder)",
        )
    return None


def _listed_leftovers(entries: list[FileEntry], folder_units: set[str]) -> list[Leftover]:
    """Conversion by-products and ckptctl partials, from the listing alone (outermost only)."""
    children: dict[str, set[str]] = {}
    for entry in entries:
        parent, _, name = entry.path.rpartition("/")
        children.setdefault(parent, set()).add(name)
    files = _Files(entries)
    found: list[Leftover] = []
    seen: set[str] = set()
    for entry in sorted(entries, key=lambda e: e.path):
        name = entry.path.rpartition("/")[2]
        if not (name in ("sharded", "tmp") or PARTIAL_SUFFIX in name or name.startswith(TEMP_PREFIX)):
            continue  # the cheap test first: a root's listing is mostly checkpoint files
        if seen and _under(entry.path, seen):
            continue
        what = _leftover_reason(entry, children, folder_units)
        if what is None:
            continue
        size, mtime = (entry.size, entry.mtime) if entry.type == "file" else files.below(entry.path)
        inside = _under(entry.path, folder_units)
        seen.add(entry.path)
        found.append(Leftover(what[0], entry.path, size, mtime, what[1], in_checkpoint=inside))
    return found


def _stale_saves(units: Iterable[Unit], settle_seconds: float, now: float) -> list[Leftover]:
    """In-progress checkpoints whose newest file is older than the settle time: a save that died."""
    return [
        Leftover("stale-in-progress", u.path, u.total_bytes, u.newest_mtime, u.reason, in_checkpoint=True)
        for u in units
        if u.status is Status.IN_PROGRESS
        and u.newest_mtime is not None
        and now - u.newest_mtime >= settle_seconds
    ]


def _tiered_units(entries: Iterable[FileEntry], units: set[str]) -> set[str]:
    """Checkpoints for which ROOT holds a tier manifest (``<run>/.ckptctl-tier/<unit>.json``, by name)."""
    tiered: set[str] = set()
    for entry in entries:
        if entry.type != "file" or posixpath.basename(entry.parent) != MANIFEST_DIR:
            continue
        run = posixpath.dirname(entry.parent)
        unit = unit_of_manifest(f"{MANIFEST_DIR}/{entry.name}")
        if unit is None:
            continue
        path = posixpath.join(run, unit) if run and unit else run or unit
        if path in units:
            tiered.add(path)
    return tiered


def _incomplete_uploads(root: Location, warnings: list[str]) -> list[Leftover]:
    """S3 multipart uploads started under ROOT and never completed or aborted: S3 bills their parts until an
    abort (``storage.transfer.pending_uploads``: one request per 1,000); other stores keep no such uploads."""
    try:
        pending = pending_uploads(root)
    except CkptctlError as exc:
        warnings.append(f"incomplete multipart uploads under {root.url} could not be listed: {exc.message}")
        return []
    return [
        Leftover(
            "multipart-upload",
            upload.rel,
            None,
            upload.initiated,
            f"incomplete multipart upload {upload.upload_id}: billed until aborted",
        )
        for upload in pending
    ]


def _newest(units: Sequence[Unit]) -> Unit | None:
    """The highest-step complete checkpoint; where none is complete (single files, which a listing-only scan
    does not open), the highest-step one of unknown status."""
    for status in (Status.COMPLETE, Status.UNKNOWN):
        numbered = [u for u in units if u.status is status and u.step is not None and u.counted]
        if numbered:
            return max(numbered, key=lambda u: (u.step or 0, u.newest_mtime or 0))
    return None


def survey_runs(root: Location, *, settle_seconds: float, now: float | None = None) -> RunsSurvey:
    """Every run under ``root`` with its checkpoints by status, bytes, newest step, tier manifests and
    leftovers (see the module docstring for the requests it costs). Raises NotFoundError when ``root`` is
    missing and NothingRecognisedError when it holds no checkpoint of any known layout."""
    now = time.time() if now is None else now
    entries = root.walk()
    scan = scan_run(root, settle_seconds=settle_seconds, now=now, entries=entries, read_units=False)
    warnings = list(scan.warnings)
    listed = _listed_leftovers(entries, {u.path for u in scan.units if u.kind == "dir"})
    partials = {item.path for item in listed if item.kind == "partial"}
    # What a partial folder holds (a pull's checkpoints) is the leftover, not a run of its own.
    recognised = [u for u in scan.units if u.layout is not Layout.UNKNOWN and not _under(u.path, partials)]
    containers = {u.run for u in recognised}
    members: dict[str, list[Unit]] = {}
    for unit in recognised:
        members.setdefault(run_folder(unit.run, containers), []).append(unit)
    if not members:
        raise NothingRecognisedError(
            f"no runs in {root.url}: the only checkpoints are inside partial folders", url=root.url
        )
    folders = set(members)
    leftovers: dict[str | None, list[Leftover]] = {}
    found = listed + _stale_saves(recognised, settle_seconds, now) + _incomplete_uploads(root, warnings)
    for item in found:
        leftovers.setdefault(_owner(item.path, folders), []).append(item)
    stored: Counter[str | None] = Counter()
    memo: dict[str, str | None] = {}
    for entry in entries:
        if entry.type == "file":
            stored[_owner(entry.path, folders, memo)] += entry.size
    tiered = _tiered_units(entries, {u.path for u in recognised})
    runs = []
    for folder, units in members.items():
        newest = _newest(units)
        by_status = Counter({s.value: 0 for s in Status})
        by_status.update(u.status.value for u in units)
        runs.append(
            RunSummary(
                path=folder,
                layouts=tuple(sorted({u.layout.value for u in units})),
                by_status=dict(by_status),
                bytes=stored[folder],
                checkpoint_bytes=sum(u.total_bytes for u in units),
                newest_step=newest.step if newest else None,
                newest_mtime=newest.newest_mtime if newest else None,
                tiered=sum(1 for u in units if u.path in tiered),
                leftovers=tuple(sorted(leftovers.get(folder, []), key=lambda i: i.path)),
                units=tuple(units),
            )
        )
    return RunsSurvey(
        url=root.url,
        now=now,
        settle_seconds=settle_seconds,
        runs=tuple(sorted(runs, key=lambda r: r.path)),
        outside_runs=tuple(sorted(leftovers.get(None, []), key=lambda i: i.path)),
        warnings=tuple(warnings),
        listed_files=scan.file_count,
        policy_files=policy_files_in(entries),
        listed_bytes=sum(stored.values()),
    )


__all__ = ["Leftover", "RunOrder", "RunSummary", "RunsSurvey", "run_folder", "survey_runs"]
