"""``tier push``: copy complete checkpoints to a remote run, verify them, write each manifest last, and then
(only then) free local copies that no keep rule protects.

Order per unit, chosen so that ``kill -9`` at any moment leaves nothing that reads as more than it is:
abort multipart uploads an interrupted push left under the unit; upload data files, then completion markers
(a remote listing never shows a complete-looking unit with data missing); list the unit again and compare every
object with what was sent (size and the store's checksum, or a re-read where the store has none); check the
local files did not change meanwhile; write the manifest. Pointer files (``latest``) go after every unit, and
only those naming a tiered unit. Freeing goes through prune's machinery
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
from typing import Literal

from ckptctl.catalog.model import Status, Unit
from ckptctl.catalog.scan import scan_run
from ckptctl.errors import ChecksumMismatchError, CkptctlError, RefusedError, SourceChangedError, UsageError
from ckptctl.retention.plan import COMPLETION_MARKERS, PrunePlan, PruneResult, execute, plan_prune
from ckptctl.retention.policy import Decision, Policy
from ckptctl.storage.checksums import Digest
from ckptctl.storage.location import Location, refuse_overlap
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
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestFile,
    RemoteView,
    check_manifest,
    manifest_rel,
    plausible_timestamp,
    remote_view,
)
from ckptctl.tiering.pointers import PointerCopy, push_pointers

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
class PushResult:
    outcomes: list[UnitOutcome] = field(default_factory=list)
    freed: PruneResult | None = None
    free_plan: PrunePlan | None = None
    aborted_uploads: int = 0
    pointers: list[PointerCopy] = field(default_factory=list)
    """Pointer files (``latest``...) written to the remote after the manifest of the checkpoint they name."""
    store_level: str | None = None
    """S3: the store's checksum level detected on the first file (``storage.s3_data``: A, B or C)."""
    notes: list[str] = field(default_factory=list)
    """Said once per run (a store that rejects checksum headers, say)."""

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
    data_path = None if options.dry_run else open_data_path(remote, options.jobs)
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
    tiered = {o.unit.path for o in result.outcomes if o.action in ("uploaded", "already", "would-upload")}
    # A pointer may name a checkpoint an earlier push tiered, outside this run's --steps/--min-age.
    named = (scan.unit(p.target) for p in scan.pointers)
    tiered |= {u.path for u in named if u is not None and _already_tiered(view, u)}
    if not options.dry_run:
        guard()
    result.pointers = push_pointers(local, remote, scan, tiered, dry_run=options.dry_run)
    for copy in result.pointers:
        emit("pointer", unit=scan.unit(copy.target), detail=copy.source)
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
    _verify_unit(remote, unit, done, data_path)
    _check_unchanged(local, unit)
    manifest = Manifest(
        unit=unit.path,
        kind=unit.kind,
        step=unit.step,
        layout=unit.layout.value,
        files=tuple(
            ManifestFile(
                f.path,
                done[f.path].size,
                None,
                done[f.path].part_size,
                plausible_timestamp(f.mtime),
                done[f.path].digest.crc64nvme_b64,
                done[f.path].digest.crc32c_b64,
                done[f.path].etag,
                _mode(local, f.path),
            )
            for f in unit.files
        ),
        source=local.url,
        store_level=_weakest({u.level for u in done.values()}),
    )
    rel = manifest_rel(unit.path)
    encoded = manifest.encode()
    if len(encoded) > MAX_MANIFEST_BYTES:
        raise RefusedError(
            f"{unit.path}: its manifest would be {len(encoded):,} bytes, over the {MAX_MANIFEST_BYTES:,} a pull "
            "reads; not tiered",
            url=remote.url_of(rel),
        )
    # Never write a manifest that pull and status would refuse (a local name they cannot take, say).
    Manifest.decode(encoded, name=remote.url_of(rel))
    guard()
    remote.write_bytes(rel, encoded)
    return sent, aborted


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


def _mode(local: Location, rel: str) -> int | None:
    """The permission bits a pull gives back (a local run only; a link was refused before upload)."""
    if not local.is_local:
        return None
    try:
        return os.lstat(local.full_path(rel)).st_mode & 0o777
    except OSError:
        return None


def _weakest(levels: set[str | None]) -> str | None:
    """A unit's level: that of its least verified file (None when a file was verified by a re-read only)."""
    if not levels or None in levels:
        return None
    return min((str(level) for level in levels), key=_LEVEL_RANK.index)


def _verify_unit(
    remote: Location, unit: Unit, done: dict[str, Uploaded], data_path: S3DataPath | None
) -> None:
    """List what the store holds for the unit now and compare it with what was sent: sizes, the ETag the
    upload answered with, and, where the store checked nothing itself (level None), a re-read."""
    if unit.kind == "dir":
        prefix = f"{unit.path}/"
        fresh = {prefix + e.path: e for e in remote.child(unit.path).walk() if e.type == "file"}
    else:
        fresh = {unit.path: remote.stat(unit.path)}
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
