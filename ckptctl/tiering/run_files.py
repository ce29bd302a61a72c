"""Run-level files in ``tier``: a run's config.json, tokenizer files, metric files (eval.jsonl), trainer logs.

What they are: the regular files of the local run that lie in no checkpoint (no recognised unit of a fresh
``scan_run`` over the same listing): files at the run root, in folders such as ``logs/`` or ``.hydra/``, and beside
checkpoints in folders that hold some (Lightning's ``version_0/hparams.yaml``, ``metrics.csv``). Never among them:
ckptctl's own state (the run lock, prune's journal, ``.ckptctl-tier/``, partial folders and temporary files),
pointer files (``tiering.pointers`` sends those once what they name is tiered) and ``-unfinished`` markers (they
say a checkpoint is being written, so restored after that checkpoint was tiered they would call it unfinished).
Links are never followed and anything that is not a regular file is never read: both are skipped and reported.

Bounds (these are metadata, not data): files are grouped by their first path component (a file at the run root
is a group of its own, a top-level folder with everything below it another). A group of more than
``MAX_GROUP_FILES`` files or ``MAX_GROUP_BYTES`` bytes is skipped whole and reported; groups are then taken in path
order while the run's total stays within ``MAX_RUN_FILES`` files and ``MAX_RUN_BYTES`` bytes, and the rest are
skipped and reported.

This module decides (what is a run file, what a push must send, how the local run differs from the manifest);
``push`` and ``pull`` move the bytes through the checkpoints' own data path. Its kill -9 argument, for push: the
manifest on the store only ever lists objects that match it. Before an object the previous manifest lists is
overwritten, that manifest is rewritten without it (``RunFilesPlan.interim``); new objects go up, are verified,
and only then is the new manifest written. Files removed locally stay listed (a push from a partial copy of the
run never drops the remote's only record of its config.json); push never frees run files locally.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ckptctl.catalog.journal import JOURNAL_NAME
from ckptctl.catalog.layouts import POINTER_FILE_NAMES, UNFINISHED_SUFFIX
from ckptctl.catalog.model import Layout, RunScan
from ckptctl.catalog.scan import scan_run
from ckptctl.errors import NotFoundError
from ckptctl.humanize import format_bytes
from ckptctl.storage.atomic import PARTIAL_SUFFIX, TEMP_PREFIX
from ckptctl.storage.location import FileEntry, Location
from ckptctl.storage.lock import LOCK_NAME
from ckptctl.storage.transfer import digest_local_file
from ckptctl.tiering.manifest import (
    MANIFEST_DIR,
    RUN_FILES_LAYOUT,
    Manifest,
    ManifestFile,
    RemoteView,
    check_file,
    plausible_timestamp,
)

MAX_GROUP_FILES = 2_000
"""Files one top-level folder of run files may hold (a wandb/ or logs/ folder has tens; a dataset has more)."""
MAX_GROUP_BYTES = 2 * 2**30
"""Bytes one top-level folder (or one file at the run root) of run files may hold."""
MAX_RUN_FILES = 10_000
"""Run files a push sends and records at most (a manifest of this many is about 3 MB, well inside the cap)."""
MAX_RUN_BYTES = 8 * 2**30
"""Bytes of run files a push sends and records at most."""
RUN_FILES_PARTIAL = "run-files"
"""``pull`` assembles run files in ``DEST/.run-files.ckptctl-partial`` (``storage.atomic.partial_folder``)."""


@dataclass(frozen=True)
class Skipped:
    """A file (or a folder: path ending in ``/``) of the run that is not pushed, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class RunFileSelection:
    """The run files of a local run as listed now, and what was left out with a reason."""

    files: tuple[FileEntry, ...] = ()
    skipped: tuple[Skipped, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def is_ckptctl_state(path: str) -> bool:
    """Whether ``path`` (relative to a run) is, or lies inside, something ckptctl writes for itself: never a run
    file, never restored."""
    parts = path.split("/")
    return any(
        part in (LOCK_NAME, JOURNAL_NAME, MANIFEST_DIR)
        or part.startswith(TEMP_PREFIX)
        or PARTIAL_SUFFIX in part
        for part in parts
    )


def _not_ours_to_send(path: str) -> bool:
    """Files with a meaning for one checkpoint, moved by other code (pointers) or by none (markers)."""
    name = posixpath.basename(path)
    return name in POINTER_FILE_NAMES or name.endswith(UNFINISHED_SUFFIX)


def _owner(path: str, unit_paths: set[str]) -> str | None:
    """The checkpoint ``path`` lies in, if any."""
    parent = path
    while parent:
        if parent in unit_paths:
            return parent
        parent = posixpath.dirname(parent)
    return "" if "" in unit_paths else None


def select_run_files(local: Location, entries: Iterable[FileEntry], scan: RunScan) -> RunFileSelection:
    """The run files among ``entries`` (a listing of ``local``) given what ``scan`` found in that same listing,
    within the bounds of the module docstring. Unrecognised units count as run files: they are not checkpoints
    ckptctl can tier. A link the scan reads as a pointer (Lightning's ``last.ckpt``) is left out silently, as
    ``tiering.pointers`` leaves it; any other link is reported."""
    unit_paths = {u.path for u in scan.units if u.layout is not Layout.UNKNOWN}
    pointer_links = {p.source for p in scan.pointers}
    if "" in unit_paths:
        return RunFileSelection()  # the run is itself one checkpoint: every file is in it
    found: list[FileEntry] = []
    skipped: list[Skipped] = []
    for entry in entries:
        if entry.type == "directory" or _owner(entry.path, unit_paths) is not None:
            continue
        if is_ckptctl_state(entry.path) or _not_ours_to_send(entry.path):
            continue
        if entry.type == "link" and entry.path in pointer_links:
            continue
        if entry.type == "link":
            skipped.append(Skipped(entry.path, f"a symbolic link (to {entry.link_target!r}): never followed"))
            continue
        if local.is_local:
            try:
                info = os.lstat(local.full_path(entry.path))
            except FileNotFoundError:
                continue  # removed since the listing
            if not stat.S_ISREG(info.st_mode):
                skipped.append(
                    Skipped(entry.path, "not a regular file (a FIFO, device or socket): never read")
                )
                continue
        found.append(entry)
    groups: dict[str, list[FileEntry]] = {}
    for entry in found:
        groups.setdefault(entry.path.split("/", 1)[0], []).append(entry)
    chosen: list[FileEntry] = []
    total_files = total_bytes = 0
    for key in sorted(groups):
        group = groups[key]
        size = sum(e.size for e in group)
        shown = key if len(group) == 1 and group[0].path == key else f"{key}/"
        if len(group) > MAX_GROUP_FILES or size > MAX_GROUP_BYTES:
            skipped.append(
                Skipped(
                    shown,
                    f"{len(group):,} file(s), {format_bytes(size)}: more than the {MAX_GROUP_FILES:,} files or "
                    f"{format_bytes(MAX_GROUP_BYTES)} a run's metadata holds; not pushed",
                )
            )
            continue
        if total_files + len(group) > MAX_RUN_FILES or total_bytes + size > MAX_RUN_BYTES:
            skipped.append(
                Skipped(
                    shown,
                    f"the run's files would pass {MAX_RUN_FILES:,} files or {format_bytes(MAX_RUN_BYTES)}; "
                    "not pushed",
                )
            )
            continue
        chosen += group
        total_files += len(group)
        total_bytes += size
    return RunFileSelection(tuple(sorted(chosen, key=lambda e: e.path)), tuple(skipped))


def local_run_files(local: Location, *, settle_seconds: float) -> RunFileSelection:
    """The run files of ``local`` now: one fresh walk, and the checkpoints scanned from that same walk (a
    checkpoint saved since the push started is a checkpoint, not a folder of run files). A missing run has none."""
    try:
        entries = local.walk()
    except NotFoundError:
        return RunFileSelection()
    scan = scan_run(
        local, settle_seconds=settle_seconds, require_units=False, entries=entries, read_units=False
    )
    return select_run_files(local, entries, scan)


def file_mode(local: Location, rel: str) -> int | None:
    """The permission bits a pull gives back (a local run only; a link was refused before upload)."""
    if not local.is_local:
        return None
    try:
        return os.lstat(local.full_path(rel)).st_mode & 0o777
    except OSError:
        return None


@dataclass(frozen=True)
class RunFilesPlan:
    """What a push does with the run files: send some, keep the others' records."""

    previous: Manifest | None
    """The valid run-files manifest on the store before this push."""
    send: tuple[FileEntry, ...]
    """New files, changed ones, and ones whose object the listing no longer vouches for."""
    kept: tuple[ManifestFile, ...]
    """Files unchanged since they were pushed (by size and time, or by checksum: then with their new time)."""
    remote_only: tuple[ManifestFile, ...]
    """Files listed by the previous manifest that are not in the local run: still listed."""
    skipped: tuple[Skipped, ...]
    rewrite: bool = False
    """The store's run-files manifest cannot be trusted (``RemoteView.bad_run_files``): write a new one."""

    @property
    def replaced(self) -> frozenset[str]:
        """Files whose object a push overwrites while the previous manifest lists it."""
        listed = {f.path for f in self.previous.files} if self.previous else set()
        return frozenset(e.path for e in self.send if e.path in listed)

    def interim(self) -> Manifest | None:
        """The previous manifest less the files about to be overwritten (None when none is left): written before
        the first of them is, so no manifest ever lists an object that does not match it."""
        if self.previous is None:
            return None
        files = tuple(f for f in self.previous.files if f.path not in self.replaced)
        return replace(self.previous, files=files) if files else None

    def manifest(
        self, sent: Iterable[ManifestFile], *, source: str, store_level: str | None
    ) -> Manifest | None:
        """The manifest after the files ``sent`` are on the store and verified (None: there are no run files)."""
        files = tuple(sorted((*self.kept, *self.remote_only, *sent), key=lambda f: f.path))
        if not files:
            return None
        return Manifest("", "dir", None, RUN_FILES_LAYOUT, files, source, store_level=store_level)

    def needs_write(self, manifest: Manifest | None) -> bool:
        """Whether ``manifest`` says anything the store's does not (times and modes included)."""
        if manifest is None:
            return False
        return self.rewrite or self.previous is None or self.previous.files != manifest.files


def plan_run_files(local: Location, view: RemoteView, selection: RunFileSelection) -> RunFilesPlan:
    """Compare the local run files with the store's run-files manifest. A file is not sent again when its size
    and time are those recorded, or (same size, another time) its bytes hash to the recorded checksums, and the
    listing still vouches for its object (the check ``tier status`` makes); otherwise it is."""
    previous = view.run_files
    recorded = {f.path: f for f in previous.files} if previous else {}
    kept: list[ManifestFile] = []
    send: list[FileEntry] = []
    for entry in selection.files:
        item = recorded.get(entry.path)
        if item is None or entry.size != item.size or not check_file(view, item).ok:
            send.append(entry)
            continue
        mtime = plausible_timestamp(entry.mtime)
        if mtime == item.mtime:
            kept.append(item)
        elif item.matches(digest_local_file(local.full_path(entry.path), item.md5_part_size)):
            kept.append(replace(item, mtime=mtime, mode=file_mode(local, entry.path)))
        else:
            send.append(entry)
    local_paths = {e.path for e in selection.files}
    remote_only = tuple(f for path, f in recorded.items() if path not in local_paths)
    return RunFilesPlan(
        previous, tuple(send), tuple(kept), remote_only, selection.skipped, view.bad_run_files is not None
    )


@dataclass(frozen=True)
class RunFilesDiff:
    """How the local run files stand against the manifest, by size and time alone (no file is read)."""

    changed: tuple[str, ...]
    """Listed, and locally of another size or time: changed since the push (or touched)."""
    local_only: tuple[str, ...]
    """Not listed: the next push sends them."""
    remote_only: tuple[str, ...]
    """Listed, not in the local run: ``pull --all`` restores them."""


def compare(selection: RunFileSelection, manifest: Manifest | None) -> RunFilesDiff:
    """``tier status``'s view of the run files (see ``RunFilesDiff``)."""
    recorded = {f.path: f for f in manifest.files} if manifest else {}
    local = {e.path: e for e in selection.files}
    changed = tuple(
        p
        for p, e in local.items()
        if p in recorded and (e.size, plausible_timestamp(e.mtime)) != (recorded[p].size, recorded[p].mtime)
    )
    return RunFilesDiff(
        changed,
        tuple(p for p in local if p not in recorded),
        tuple(p for p in recorded if p not in local),
    )


def refused_reason(path: str, unit_paths: Sequence[str] | set[str]) -> str | None:
    """Why ``pull`` must not write a file a run-files manifest lists (remote input): one of ckptctl's own names,
    a pointer file or marker, or a path inside a tiered checkpoint; None when it may."""
    if is_ckptctl_state(path):
        return "is one of ckptctl's own file names"
    if _not_ours_to_send(path):
        return "is a pointer file or a checkpoint's marker, never a run file"
    owner = _owner(path, set(unit_paths))
    if owner is not None:
        return f"lies inside checkpoint {owner}"
    return None
