"""``tier status``: where each checkpoint of a run is (local, remote, both) and whether the remote copy holds up;
then one summary of the run's own files (``tiering.run_files``): how many are pushed, whether the store's copies
match their manifest, and which changed locally since."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckptctl.catalog.model import Unit
from ckptctl.catalog.scan import scan_run
from ckptctl.errors import NotFoundError
from ckptctl.storage.location import Location
from ckptctl.storage.s3_data import S3DataPath
from ckptctl.storage.transfer import open_data_path
from ckptctl.tiering.manifest import Manifest, RemoteView, check_manifest, remote_view
from ckptctl.tiering.run_files import RunFileSelection, Skipped, compare, select_run_files


@dataclass(frozen=True)
class StatusRow:
    path: str
    step: int | None
    local: str | None
    """The local catalog status (complete, incomplete, …) or None when the checkpoint is not on the local disk."""
    local_bytes: int
    remote: str
    """``verified``, ``size-only`` (store without checksums, no --verify), ``corrupt``, ``partial`` (objects but
    no manifest: an interrupted push) or ``-`` (not on the remote)."""
    remote_bytes: int
    problems: tuple[str, ...] = ()
    store_level: str | None = None
    """What verified the remote copy at push (``tiering.manifest.STORE_LEVELS``: S3 levels A, B, C, or GCS
    ``crc32c``); None for v1 manifests and stores that check nothing themselves."""

    @property
    def where(self) -> str:
        on_remote = self.remote in ("verified", "size-only")
        if self.local is not None and on_remote:
            return "both"
        if on_remote:
            return "remote"
        return "local" if self.local is not None else "nowhere"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "step": self.step,
            "where": self.where,
            "local": self.local,
            "local_bytes": self.local_bytes,
            "remote": self.remote,
            "remote_bytes": self.remote_bytes,
            "problems": list(self.problems),
            "store_level": self.store_level,
        }


@dataclass(frozen=True)
class RunFilesRow:
    """The run's own files: the local ones against the store's run-files manifest."""

    remote: str
    """As for a checkpoint: ``verified``, ``size-only``, ``corrupt`` (an object that does not match, or a manifest
    that does not validate) or ``-`` (no run-files manifest)."""
    files: int
    """Files the manifest lists."""
    remote_bytes: int
    local_files: int
    local_bytes: int
    changed: tuple[str, ...] = ()
    local_only: tuple[str, ...] = ()
    remote_only: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    problems: tuple[str, ...] = ()
    store_level: str | None = None

    @property
    def where(self) -> str:
        on_remote = self.remote in ("verified", "size-only")
        if self.local_files and on_remote:
            return "both"
        if on_remote:
            return "remote"
        return "local" if self.local_files else "nowhere"

    @property
    def local_state(self) -> str:
        """The LOCAL cell: ``unchanged``, or how many changed and are not pushed yet."""
        if not self.local_files:
            return "-"
        parts = [f"{len(self.changed)} changed"] if self.changed else []
        parts += [f"{len(self.local_only)} not pushed"] if self.local_only else []
        return ", ".join(parts) or "unchanged"

    def to_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "remote": self.remote,
            "files": self.files,
            "remote_bytes": self.remote_bytes,
            "local_files": self.local_files,
            "local_bytes": self.local_bytes,
            "changed_locally": list(self.changed),
            "not_pushed": list(self.local_only),
            "remote_only": list(self.remote_only),
            "skipped": [s.to_dict() for s in self.skipped],
            "problems": list(self.problems),
            "store_level": self.store_level,
        }


@dataclass
class TierStatus:
    """What ``tier status`` shows: the checkpoints' rows, then the run files' one."""

    units: list[StatusRow]
    run_files: RunFilesRow | None = None
    """None when the run has no run files and the store no run-files manifest."""


def tier_status(
    local: Location, remote: Location, *, reread: bool = False, settle_seconds: float = 600.0
) -> list[StatusRow]:
    """One row per checkpoint found locally or named by a remote manifest, in step order."""
    return run_status(local, remote, reread=reread, settle_seconds=settle_seconds).units


def run_status(
    local: Location, remote: Location, *, reread: bool = False, settle_seconds: float = 600.0
) -> TierStatus:
    """``tier_status``'s rows and the run files' summary, from one local walk and one remote view."""
    units: tuple[Unit, ...] = ()
    selection = RunFileSelection()
    try:
        entries = local.walk()
        scan = scan_run(local, settle_seconds=settle_seconds, require_units=False, entries=entries)
        units, selection = scan.units, select_run_files(local, entries, scan)
    except NotFoundError:
        if not local.is_local:
            raise
        # everything may have been freed, or the run is being restored elsewhere
    view = remote_view(remote)
    data = open_data_path(remote, 4) if reread else None  # one client for every HeadObject of --verify
    rows = _unit_rows(view, units, reread, data)
    return TierStatus(rows, _run_files_row(view, selection, reread, data))


def _run_files_row(
    view: RemoteView, selection: RunFileSelection, reread: bool, data: S3DataPath | None
) -> RunFilesRow | None:
    manifest = view.run_files
    if manifest is None and view.bad_run_files is None and not selection.files and not selection.skipped:
        return None
    diff = compare(selection, manifest)
    local = (len(selection.files), selection.total_bytes)
    if manifest is None:
        bad = view.bad_run_files
        state, problems = ("corrupt", (bad.error.message,)) if bad is not None else ("-", ())
        return RunFilesRow(
            state, 0, 0, *local, local_only=diff.local_only, skipped=selection.skipped, problems=problems
        )
    check = check_manifest(view, manifest, reread=reread, data=data)
    return RunFilesRow(
        check.state if check.ok else "corrupt",
        len(manifest.files),
        manifest.total_bytes,
        *local,
        changed=diff.changed,
        local_only=diff.local_only,
        remote_only=diff.remote_only,
        skipped=selection.skipped,
        problems=check.problems,
        store_level=manifest.store_level,
    )


def _unit_rows(
    view: RemoteView, units: tuple[Unit, ...], reread: bool, data: S3DataPath | None
) -> list[StatusRow]:
    """One row per checkpoint found locally or named by a remote manifest, in step order."""
    bad_by_unit = {bad.unit: bad for bad in view.bad_manifests.values() if bad.unit is not None}
    rows: list[StatusRow] = []
    seen: set[str] = set()
    for unit in units:
        seen.add(unit.path)
        manifest = view.manifests.get(unit.path)
        if manifest is not None:
            rows.append(_checked(view, manifest, unit.status.value, unit.total_bytes, reread, data))
            continue
        objects = view.objects_of(unit.path, unit.kind)
        remote_bytes = sum(e.size for e in objects)
        bad = bad_by_unit.get(unit.path)
        if bad is not None:
            row = StatusRow(
                unit.path,
                unit.step,
                unit.status.value,
                unit.total_bytes,
                "corrupt",
                remote_bytes,
                (bad.error.message,),
            )
        else:
            row = StatusRow(
                unit.path,
                unit.step,
                unit.status.value,
                unit.total_bytes,
                "partial" if objects else "-",
                remote_bytes,
                (f"{len(objects)} object(s) but no manifest",) if objects else (),
            )
        rows.append(row)
    for path, manifest in view.manifests.items():
        if path not in seen:
            rows.append(_checked(view, manifest, None, 0, reread, data))
    for bad in view.bad_manifests.values():
        if bad.unit is None or bad.unit not in seen:
            rows.append(StatusRow(bad.shown, bad.step, None, 0, "corrupt", 0, (bad.error.message,)))
    rows.sort(key=lambda r: (r.step is None, r.step or 0, r.path))
    return rows


def _checked(
    view: RemoteView,
    manifest: Manifest,
    local: str | None,
    local_bytes: int,
    reread: bool,
    data: S3DataPath | None,
) -> StatusRow:
    """The row of a checkpoint that has a manifest: what the store holds, checked against it."""
    check = check_manifest(view, manifest, reread=reread, data=data)
    state = check.state if check.ok else "corrupt"
    return StatusRow(
        manifest.unit,
        manifest.step,
        local,
        local_bytes,
        state,
        manifest.total_bytes,
        check.problems,
        manifest.store_level,
    )
