"""``tier push``: copy complete checkpoints to a remote run, verify them, write each manifest last, and then
(only then) free local copies that no keep rule protects.

Order per unit, chosen so that ``kill -9`` at any moment leaves nothing that reads as more than it is:
abort multipart uploads an interrupted push left under the unit; upload data files, then completion markers
(a remote listing never shows a complete-looking unit with data missing); list the unit again and compare every
object with what was sent (size and the store's checksum, or a re-read where the store has none); check the
local files did not change meanwhile; write the manifest. Pointer files (``latest``) go after every unit, and
only those naming a tiered unit. The run's own files (config.json, tokenizer, metrics, logs: ``run_files``) go
next, through the same upload and verification, their manifest last. Freeing goes through prune's machinery
(``retention.plan.execute``: re-validation, journal, markers first) under the run lock, and only for units whose
manifest a fresh listing has just verified.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ckptctl.catalog.model import Status, Unit
from ckptctl.catalog.scan import scan_run
from ckptctl.errors import ChecksumMismatchError, CkptctlError, RefusedError, SourceChangedError, UsageError
from ckptctl.retention.plan import COMPLETION_MARKERS, PrunePlan, PruneResult, execute, plan_prune
from ckptctl.retention.policy import Decision, Policy
from ckptctl.storage.checksums import Digest
from ckptctl.storage.location import FileEntry, Location, refuse_overlap
from ckptctl.storage.lock import Lease
from ckptctl.storage.s3_data import S3DataPath
from ckptctl.storage.transfer import (
    DEFAULT_PART_SIZE,
    Uploaded,
    abort_stale_uploads,
    digest_local_file,
    open_data_path,
    reread,
    stored_checksum,
    upload,
)
from ckptctl.tiering.manifest import (
    LEVEL_PROBE,
    MAX_MANIFEST_BYTES,
    RUN_FILES_MANIFEST,
    Manifest,
    ManifestFile,
    RemoteView,
    check_manifest,
    manifest_rel,
    plausible_timestamp,
    remote_view,
)
from ckptctl.tiering.pointers import PointerCopy, push_pointers
from ckptctl.tiering.run_files import Skipped, file_mode, local_run_files, plan_run_files

EventSink = Callable[..., None]


def default_jobs() -> int:
    """Parallel streams: 4 on a small box (the client and a local server share the CPU), up to 16 on big ones."""
    return max(4, min(16, 2 * (os.cpu_count() or 2)))


@dataclass(frozen=True)
class PushOptions:
    steps: frozenset[int] | None = None
    min_age_seconds: float | None = None
    settle_seconds: float = 600.0
    jobs: int = field(default_factory=default_jobs)
    part_size: int = DEFAULT_PART_SIZE
    free_policy: Policy | None = None
    metric_file: Location | None = None
    dry_run: bool = False
    confirm_free: Callable[[PrunePlan], bool] | None = None
    """Asked before local copies are freed (the CLI asks at a terminal, as prune does); False keeps them."""


PushAction = Literal["uploaded", "already", "would-upload", "failed"]
"""``uploaded``, ``already`` (a verified manifest was there), ``would-upload`` (dry run), ``failed``."""
PUSH_ACTIONS: tuple[PushAction, ...] = ("uploaded", "already", "would-upload", "failed")


@dataclass
class UnitOutcome:
    unit: Unit
    action: PushAction
    uploaded_bytes: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class RunFilesPush:
    """What a push did with the run's own files (``run_files``)."""

    sent: list[tuple[str, int]] = field(default_factory=list)
    """Files uploaded and verified, with the bytes sent (0: the store already held those bytes)."""
    unchanged: int = 0
    would_send: list[str] = field(default_factory=list)
    """A dry run: the files a push would send."""
    skipped: tuple[Skipped, ...] = ()
    """Links, non-regular files and folders over the bounds: never pushed."""
    changed_while_sent: list[str] = field(default_factory=list)
    failed: str | None = None
    """Why the run files were not (all) recorded this time; the store's manifest still matches its objects."""
    manifest_written: bool = False
    aborted_uploads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": [{"path": path, "bytes": sent} for path, sent in self.sent],
            "unchanged": self.unchanged,
            "would_send": list(self.would_send),
            "skipped": [s.to_dict() for s in self.skipped],
            "changed_while_sent": list(self.changed_while_sent),
            "failed": self.failed,
            "manifest_written": self.manifest_written,
        }


@dataclass
class PushResult:
    outcomes: list[UnitOutcome] = field(default_factory=list)
    freed: PruneResult | None = None
    free_plan: PrunePlan | None = None
    aborted_uploads: int = 0
    pointers: list[PointerCopy] = field(default_factory=list)
    """Pointer files (``latest``...) written to the remote after the manifest of the checkpoint they name."""
    store_level: str | None = None
    """S3: the store's checksum level, probed before the first file (``storage.s3_data``: A, B or C)."""
    body_guard: str | None = None
    """S3: what guarded each body sent (``storage.s3_data``): crc64nvme, sha256 (a signed payload) or md5."""
    notes: list[str] = field(default_factory=list)
    """Said once per run (a store that rejects checksum headers, say)."""
    run_files: RunFilesPush = field(default_factory=RunFilesPush)

    @property
    def failed(self) -> list[UnitOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    @property
    def counts(self) -> dict[PushAction, int]:
        """How many checkpoints had each outcome (every action present, zero included)."""
        return {action: sum(1 for o in self.outcomes if o.action == action) for action in PUSH_ACTIONS}

    @property
    def freed_units(self) -> list[Unit]:
        return self.freed.deleted if self.freed else []

    @property
    def uploaded_bytes(self) -> int:
        return sum(o.uploaded_bytes for o in self.outcomes)


def select_units(units: Sequence[Unit], options: PushOptions, now: float) -> list[Unit]:
    """Complete checkpoints with a step, narrowed by ``--steps`` and ``--min-age``."""
    chosen = []
    for unit in units:
        if unit.status is not Status.COMPLETE or unit.step is None:
            continue
        if options.steps is not None and unit.step not in options.steps:
            continue
        if options.min_age_seconds is not None and now - (unit.newest_mtime or now) < options.min_age_seconds:
            continue
        chosen.append(unit)
    return chosen


def same_files(unit: Unit, manifest: Manifest) -> bool:
    """Whether the local unit is still what the manifest describes: same files, sizes and modification times
    (a file rewritten since the upload, even at the same size, makes the remote copy a different checkpoint)."""
    local = {(f.path, f.size, plausible_timestamp(f.mtime)) for f in unit.files}
    return local == {(f.path, f.size, f.mtime) for f in manifest.files}


def _already_tiered(view: RemoteView, unit: Unit) -> bool:
    manifest = view.manifests.get(unit.path)
    return manifest is not None and same_files(unit, manifest) and check_manifest(view, manifest).ok


def push(
    local: Location,
    remote: Location,
    options: PushOptions,
    *,
    on_event: EventSink | None = None,
    on_bytes: Callable[[str, int], None] | None = None,
    lease: Lease | None = None,
) -> PushResult:
    """Tier a local run to ``remote``. The caller holds the local run lock and, except for a dry run, the remote
    one (``push_locks``); ``lease`` (the remote one) is checked before each upload, manifest, pointer and
    freeing, so a push that lost its lease stops there (LockedError) instead of writing unprotected."""
    emit = on_event or (lambda *a, **k: None)
    guard = lease.check if lease is not None else (lambda: None)
    check_target(local, remote)
    remote.require_bucket()
    scan = scan_run(local, settle_seconds=options.settle_seconds)
    view = remote_view(remote)
    result = PushResult()
    data_path = None if options.dry_run else open_data_path(remote, options.jobs, LEVEL_PROBE)
    for unit in select_units(scan.units, options, scan.scanned_at):
        if _already_tiered(view, unit):
            result.outcomes.append(UnitOutcome(unit, "already"))
            emit("already", unit=unit)
            continue
        if options.dry_run:
            result.outcomes.append(UnitOutcome(unit, "would-upload", unit.total_bytes))
            emit("would-upload", unit=unit)
            continue
        guard()
        started = time.monotonic()
        emit("start", unit=unit)
        try:
            sent, aborted = _push_unit(local, remote, view, unit, options, on_bytes, data_path, guard)
            result.aborted_uploads += aborted
        except (CkptctlError, OSError) as exc:
            detail = exc.message if isinstance(exc, CkptctlError) else f"{type(exc).__name__}: {exc}"
            result.outcomes.append(UnitOutcome(unit, "failed", detail=detail))
            emit("failed", unit=unit, detail=detail)
            if isinstance(exc, CkptctlError) and _fatal(exc):
                raise
            continue
        seconds = time.monotonic() - started
        news = data_path.notes[len(result.notes) :] if data_path is not None else []
        result.notes += news
        result.outcomes.append(UnitOutcome(unit, "uploaded", sent, seconds, "; ".join(news)))
        emit("uploaded", unit=unit, bytes=sent, seconds=seconds, detail="; ".join(news))
    result.store_level = data_path.level if data_path is not None else None
    result.body_guard = data_path.guard if data_path is not None else None
    tiered = {o.unit.path for o in result.outcomes if o.action in ("uploaded", "already", "would-upload")}
    # A pointer may name a checkpoint an earlier push tiered, outside this run's --steps/--min-age.
    named = (scan.unit(p.target) for p in scan.pointers)
    tiered |= {u.path for u in named if u is not None and _already_tiered(view, u)}
    if not options.dry_run:
        guard()
    result.pointers = push_pointers(local, remote, scan, tiered, dry_run=options.dry_run)
    for copy in result.pointers:
        emit("pointer", unit=scan.unit(copy.target), detail=copy.source)
    result.run_files = _push_run_files(local, remote, view, options, emit, on_bytes, data_path, guard)
    result.aborted_uploads += result.run_files.aborted_uploads
    result.notes += [
        f"run file {rel} changed while it was sent: the remote copy is what was read; the next push sends it again"
        for rel in result.run_files.changed_while_sent
    ]
    if options.free_policy is not None:
        if not options.dry_run:
            guard()
        _free_local(local, remote, options, result, emit)
    return result


def push_locks(local: Location, remote: Location, *, lease_seconds: float | None = None) -> ExitStack:
    """The locks a push holds, entered in this order: the local run's (no prune frees what is being read),
    then the remote run's (two pushes to one remote, from two machines, never interleave uploads, manifest
    writes and deletes; a prune of the remote waits too). Enter the returned stack; its ``lease`` attribute
    is the remote lease to pass to ``push``. A local remote folder is created first (its lock lives in it)."""
    from ckptctl.storage.lock import DEFAULT_LEASE_SECONDS, run_lock

    stack = ExitStack()
    seconds = lease_seconds or DEFAULT_LEASE_SECONDS
    try:
        stack.enter_context(run_lock(local, lease_seconds=seconds))
        if remote.is_local:
            with remote.errors():
                os.makedirs(remote.full_path(), exist_ok=True)
        else:
            remote.require_bucket()
        stack.lease = stack.enter_context(run_lock(remote, lease_seconds=seconds))  # type: ignore[attr-defined]
    except BaseException:
        stack.close()
        raise
    return stack


def _kept(decision: Decision) -> Decision:
    if decision.action != "delete":
        return decision
    return Decision(decision.unit, "keep", ("freeing not confirmed",))


def check_target(local: Location, remote: Location) -> None:
    """Refuse, before the lock is taken or anything is uploaded, a push that cannot be right: a run that is not
    local, or a remote that is, contains or lies inside the run (every file would be rewritten onto itself, or
    the only other copy of what is freed would live inside the run, where a later prune can delete it)."""
    if not local.is_local:
        raise UsageError(
            f"tier push reads from a local run; {local.url} is not local (use tier pull to fetch)"
        )
    refuse_overlap(remote, local, output_role="--to", source_role="RUN")


def _fatal(exc: CkptctlError) -> bool:
    """Errors that will fail every other unit too (store gone, credentials, bucket): stop at once."""
    return exc.code in (
        "storage_unavailable",
        "no_credentials",
        "no_such_bucket",
        "permission_denied",
        "no_space",
        "locked",  # the remote lease was lost: another ckptctl owns the remote run now
    )


def _push_unit(
    local: Location,
    remote: Location,
    view: RemoteView,
    unit: Unit,
    options: PushOptions,
    on_bytes: Callable[[str, int], None] | None,
    data_path: S3DataPath | None,
    guard: Callable[[], None] = lambda: None,
) -> tuple[int, int]:
    """Upload, verify and commit one unit; returns (bytes sent, stale multipart uploads aborted). ``guard``
    (the lease check) runs before each batch of files and right before the manifest is written."""
    aborted = abort_stale_uploads(remote, unit.path + "/" if unit.kind == "dir" else unit.path)
    previous = view.manifests.get(unit.path)
    if previous is not None:
        # The unit is being re-uploaded (corrupt or changed): it is not tiered until the new manifest lands.
        remote.delete_files([manifest_rel(unit.path)], verify=False)

    def progress(n: int) -> None:
        if on_bytes:
            on_bytes(unit.path, n)

    data = [f for f in unit.files if posixpath.basename(f.path) not in COMPLETION_MARKERS]
    markers = [f for f in unit.files if posixpath.basename(f.path) in COMPLETION_MARKERS]
    done: dict[str, Uploaded] = {}
    sent = 0
    for batch in (data, markers):
        guard()
        for item in _transfer_batch(
            local, remote, view, [f.path for f in batch], options, progress, data_path
        ):
            done[item[0].rel] = item[0]
            sent += item[1]
    _verify_uploaded(remote, done, _fresh_listing(remote, unit), data_path)
    _check_unchanged(local, unit)
    manifest = Manifest(
        unit=unit.path,
        kind=unit.kind,
        step=unit.step,
        layout=unit.layout.value,
        files=tuple(_manifest_file(local, f.path, f.mtime, done[f.path]) for f in unit.files),
        source=local.url,
        store_level=_weakest({u.level for u in done.values()}),
    )
    _commit_manifest(remote, manifest_rel(unit.path), manifest, guard, unit.path or ".")
    return sent, aborted


def _manifest_file(local: Location, rel: str, mtime: float | None, sent: Uploaded) -> ManifestFile:
    """A manifest's record of one uploaded, verified file: what was sent, the local time and mode."""
    return ManifestFile(
        rel,
        sent.size,
        None,
        sent.part_size,
        plausible_timestamp(mtime),
        sent.digest.crc64nvme_b64,
        sent.digest.crc32c_b64,
        sent.etag,
        file_mode(local, rel),
    )


def _commit_manifest(
    remote: Location, rel: str, manifest: Manifest, guard: Callable[[], None], what: str
) -> None:
    """Write a manifest (the commit of what it lists) once the lease is checked, never one that pull and status
    would refuse (too large to read, a local name they cannot take)."""
    encoded = manifest.encode()
    if len(encoded) > MAX_MANIFEST_BYTES:
        raise RefusedError(
            f"{what}: its manifest would be {len(encoded):,} bytes, over the {MAX_MANIFEST_BYTES:,} a pull "
            "reads; not tiered",
            url=remote.url_of(rel),
        )
    Manifest.decode(encoded, name=remote.url_of(rel))
    guard()
    remote.write_bytes(rel, encoded)


def _transfer_batch(
    local: Location,
    remote: Location,
    view: RemoteView,
    rels: list[str],
    options: PushOptions,
    progress: Callable[[int], None],
    data_path: S3DataPath | None,
) -> list[tuple[Uploaded, int]]:
    """Upload files: large ones one at a time with parallel parts, small ones side by side (memory stays
    within ``jobs`` parts either way). A file the store already holds with our digest (its own full-object
    checksum, one request) is not sent again: an interrupted push resumes where it stopped."""

    def one(rel: str, part_jobs: int) -> tuple[Uploaded, int]:
        path = local.full_path(rel)
        entry = view.entries.get(rel)
        if entry is not None and entry.size == os.path.getsize(path):
            held = stored_checksum(remote, rel, data_path)
            if held is not None:
                ours = digest_local_file(path).digest
                if held == _named(held[0], ours):
                    progress(ours.size)
                    return Uploaded(rel, ours, None, entry.etag, _LEVEL_OF[held[0]]), 0
        uploaded = upload(
            path, remote, rel, part_size=options.part_size, jobs=part_jobs, on_bytes=progress, data=data_path
        )
        return uploaded, uploaded.size

    big = [r for r in rels if os.path.getsize(local.full_path(r)) > options.part_size]
    small = [r for r in rels if r not in set(big)]
    results = [one(rel, options.jobs) for rel in big]
    if small:
        with ThreadPoolExecutor(max_workers=options.jobs, thread_name_prefix="ckptctl-file") as pool:
            results += list(pool.map(lambda r: one(r, 1), small))
    return results


_LEVEL_OF = {"crc64nvme": "A", "crc32c": "crc32c"}
_LEVEL_RANK = ("C", "B", "crc32c", "A")


def _named(name: str, digest: Digest) -> tuple[str, str]:
    return name, digest.crc64nvme_b64 if name == "crc64nvme" else digest.crc32c_b64


def _weakest(levels: set[str | None]) -> str | None:
    """A unit's level: that of its least verified file (None when a file was verified by a re-read only)."""
    if not levels or None in levels:
        return None
    return min((str(level) for level in levels), key=_LEVEL_RANK.index)


def _fresh_listing(remote: Location, unit: Unit) -> dict[str, FileEntry]:
    """What the store holds for the unit now, by path in the run (one listing, or one stat for a file)."""
    if unit.kind == "dir":
        prefix = f"{unit.path}/"
        return {prefix + e.path: e for e in remote.child(unit.path).walk() if e.type == "file"}
    return {unit.path: remote.stat(unit.path)}


def _verify_uploaded(
    remote: Location, done: dict[str, Uploaded], fresh: dict[str, FileEntry], data_path: S3DataPath | None
) -> None:
    """Compare a listing made after the uploads with what was sent: sizes, the ETag the upload answered with,
    and, where the store checked nothing itself (level None), a re-read."""
    for rel, sent in done.items():
        entry = fresh.get(rel)
        if entry is None or entry.size != sent.size:
            found = "missing" if entry is None else f"{entry.size} bytes"
            raise ChecksumMismatchError(
                f"{remote.url_of(rel)}: {found} on the store after upload, sent {sent.size} bytes",
                url=remote.url_of(rel),
            )
        if sent.etag is not None and entry.etag is not None and sent.etag != entry.etag:
            raise ChecksumMismatchError(
                f"{remote.url_of(rel)}: replaced on the store during the push (ETag {entry.etag}, "
                f"the upload gave {sent.etag})",
                url=remote.url_of(rel),
            )
        if sent.level is None:
            back = reread(remote, rel, sent.size, None, data_path).digest
            if back != sent.digest:
                raise ChecksumMismatchError(
                    f"{remote.url_of(rel)}: CRC64NVME {back.crc64nvme_b64} on the store, "
                    f"sent {sent.digest.crc64nvme_b64}",
                    url=remote.url_of(rel),
                )


def _check_unchanged(local: Location, unit: Unit) -> None:
    for item in unit.files:
        try:
            st = os.stat(local.full_path(item.path))
        except FileNotFoundError:
            raise SourceChangedError(f"{local.url_of(item.path)} disappeared during the upload") from None
        if st.st_size != item.size or (item.mtime is not None and abs(st.st_mtime - item.mtime) > 1e-6):
            raise SourceChangedError(
                f"{local.url_of(item.path)} changed during the upload; {unit.path} was not tiered "
                "(re-run once the trainer is done with it)"
            )


def _push_run_files(
    local: Location,
    remote: Location,
    view: RemoteView,
    options: PushOptions,
    emit: EventSink,
    on_bytes: Callable[[str, int], None] | None,
    data_path: S3DataPath | None,
    guard: Callable[[], None],
) -> RunFilesPush:
    """Send the run's changed and new files and record them in the run-files manifest, in the order the
    ``run_files`` docstring gives (manifest less what is overwritten, uploads, verification, manifest). A failure
    that is not fatal to the push is reported (``failed``) and leaves the store's manifest matching its objects;
    the next push sends what is missing. ``view`` is the listing made at the start: the lease kept any other
    push from changing these objects since."""
    plan = plan_run_files(local, view, local_run_files(local, settle_seconds=options.settle_seconds))
    outcome = RunFilesPush(unchanged=len(plan.kept), skipped=plan.skipped)
    if options.dry_run:
        outcome.would_send = [e.path for e in plan.send]
        return outcome
    done: dict[str, Uploaded] = {}

    def progress(n: int) -> None:
        if on_bytes:
            on_bytes("(run files)", n)

    try:
        if plan.replaced:
            interim = plan.interim()
            guard()
            if interim is None:
                remote.delete_files([RUN_FILES_MANIFEST], verify=False)
            else:
                _commit_manifest(remote, RUN_FILES_MANIFEST, interim, guard, "the run files")
        if plan.send:
            guard()
            # A killed push's multipart uploads of run files (the whole run's, once: unit prefixes do not cover
            # the run root); one of a file unchanged since is spared and resumed (``abort_stale_uploads``).
            outcome.aborted_uploads = abort_stale_uploads(remote, "")
            rels = [e.path for e in plan.send]
            for uploaded, sent in _transfer_batch(local, remote, view, rels, options, progress, data_path):
                done[uploaded.rel] = uploaded
                outcome.sent.append((uploaded.rel, sent))
            fresh = {e.path: e for e in remote.walk() if e.type == "file"}
            _verify_uploaded(remote, done, fresh, data_path)
        listed = {e.path: e for e in plan.send}
        outcome.changed_while_sent = [rel for rel in done if _changed(local, listed[rel])]
        levels = {u.level for u in done.values()}
        if plan.previous is not None and (plan.kept or plan.remote_only):
            levels.add(plan.previous.store_level)
        manifest = plan.manifest(
            (_manifest_file(local, rel, listed[rel].mtime, up) for rel, up in done.items()),
            source=local.url,
            store_level=_weakest(levels),
        )
        if manifest is not None and plan.needs_write(manifest):
            _commit_manifest(remote, RUN_FILES_MANIFEST, manifest, guard, "the run files")
            outcome.manifest_written = True
    except (CkptctlError, OSError) as exc:
        if isinstance(exc, CkptctlError) and _fatal(exc):
            raise
        outcome.failed = exc.message if isinstance(exc, CkptctlError) else f"{type(exc).__name__}: {exc}"
        outcome.sent = []  # not recorded: the next push sends them again
        emit("failed", unit=None, detail=f"run files: {outcome.failed}")
        return outcome
    for rel, sent in outcome.sent:
        emit("run-file", unit=None, bytes=sent, detail=rel)
    return outcome


def _changed(local: Location, entry: FileEntry) -> bool:
    """Whether a run file is no longer what was listed before it was sent (a log still being written): its
    record then keeps the listed time, so the next push sees the change and sends it again."""
    try:
        info = os.stat(local.full_path(entry.path))
    except FileNotFoundError:
        return True
    return info.st_size != entry.size or (entry.mtime is not None and abs(info.st_mtime - entry.mtime) > 1e-6)


def _free_local(
    local: Location,
    remote: Location,
    options: PushOptions,
    result: PushResult,
    emit: EventSink,
) -> None:
    """Delete local copies the keep rules do not protect, but only those a fresh remote listing verifies.

    The plan is prune's own (``plan_prune``: one run, time order, metric checks, kept markers confirmed); tier
    only turns a planned deletion into a keep where the remote copy is missing or not verified."""
    assert options.free_policy is not None
    plan = plan_prune(
        local, options.free_policy, settle_seconds=options.settle_seconds, metric_file=options.metric_file
    )
    view = remote_view(remote)
    decisions: list[Decision] = []
    for decision in plan.decisions:
        if decision.action != "delete":
            decisions.append(decision)
            continue
        manifest = view.manifests.get(decision.unit.path)
        if manifest is None:
            decisions.append(Decision(decision.unit, "keep", ("not tiered",)))
            continue
        # Where the store keeps no checksum, the copy is re-read: sizes alone never justify a deletion.
        check = check_manifest(view, manifest, reread=True)
        if not check.ok or not same_files(decision.unit, manifest):
            why = check.problems[0] if check.problems else "local files differ from the remote copy"
            decisions.append(Decision(decision.unit, "keep", (f"remote copy not verified: {why}",)))
            continue
        decisions.append(Decision(decision.unit, "delete", (*decision.reasons, f"tiered ({check.state})")))
    # An interrupted prune's journal is prune's to finish, not tier's.
    plan = replace(plan, decisions=tuple(decisions), resume=())
    result.free_plan = plan
    if options.dry_run or not plan.to_delete:
        return
    if options.confirm_free is not None and not options.confirm_free(plan):
        result.notes.append(f"kept {len(plan.to_delete)} local checkpoint(s): freeing them was not confirmed")
        result.free_plan = replace(plan, decisions=tuple(_kept(d) for d in plan.decisions))
        return

    def relay(kind: str, unit: Unit, detail: str) -> None:
        emit("freed" if kind == "deleted" else kind, unit=unit, detail=detail)

    result.freed = execute(plan, local, settle_seconds=options.settle_seconds, on_event=relay)
