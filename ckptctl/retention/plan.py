"""Plan, then execute: what prune will delete and why, and a deletion order that survives ``kill -9``.

``plan_prune`` scans the run and applies the policy (no change to anything). ``execute`` re-validates the
plan against a fresh listing, writes the journal (``catalog/journal.py``: from then on the catalog reports the
doomed units incomplete), deletes every completion marker, then the data, in batches, then the journal. A
re-run finishes any unit an interrupted run left in the journal.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptctl.catalog.journal import JOURNAL_NAME, encode_journal
from ckptctl.catalog.listing import unit_to_dict
from ckptctl.catalog.markers import confirm_markers, marker_checkable
from ckptctl.catalog.model import Layout, RunScan, Status, Unit
from ckptctl.catalog.scan import scan_run
from ckptctl.errors import MetricSourceError, NothingRecognisedError, RefusedError, UsageError, literal
from ckptctl.humanize import format_bytes
from ckptctl.retention.metrics import load_metric_file
from ckptctl.retention.policy import Decision, Policy, decide, decide_incomplete
from ckptctl.storage.location import Location

# Files whose presence tells a reader "this checkpoint is whole": removed first, so that a unit never looks
# complete once its data has started to go.
COMPLETION_MARKERS = {
    "trainer_state.json",
    ".metadata",
    ".metadata.json",
    "COMPLETED",
    "_CHECKPOINT_METADATA",
    "commit_success.txt",
    "model.safetensors.index.json",
}
# Two runs in one folder (a restart writing checkpoint-100 next to an older run's checkpoint-500) show up as a
# lower step written clearly later than a higher one.
ORDER_TOLERANCE_SECONDS = 600.0
RESUME_REASON = "finishing an interrupted prune"


@dataclass(frozen=True)
class PrunePlan:
    url: str
    policy: Policy
    decisions: tuple[Decision, ...]
    resume: tuple[Unit, ...]
    """Units an interrupted prune had started deleting (named by its journal)."""
    notes: tuple[str, ...]
    created_at: float

    @property
    def to_delete(self) -> list[Unit]:
        return [d.unit for d in self.decisions if d.action == "delete"]

    @property
    def bytes_to_free(self) -> int:
        return sum(u.total_bytes for u in [*self.to_delete, *self.resume])

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.url,
            "units": [
                {**unit_to_dict(d.unit, self.created_at), "action": d.action, "reasons": list(d.reasons)}
                for d in self.decisions
            ],
            "resume": [u.path for u in self.resume],
            "notes": list(self.notes),
            "delete_count": len(self.to_delete) + len(self.resume),
            "bytes_to_free": self.bytes_to_free,
        }


def _check_order(units: Sequence[Unit]) -> None:
    """Rule 4: refuse when step order and time order disagree (two runs sharing one folder)."""
    dated = sorted(
        (u for u in units if u.status is Status.COMPLETE and u.step is not None and u.newest_mtime),
        key=lambda u: u.step or 0,
    )
    seen: dict[tuple[str, int], Unit] = {}
    for unit in units:
        # Lightning names a second file for the same step "-v1" when two fits write into one dirpath: the
        # steps restart, so step order says nothing even when the clocks agree.
        if unit.layout is Layout.LIGHTNING and unit.is_ranked and unit.step is not None:
            other = seen.setdefault((unit.run, unit.step), unit)
            if other is not unit:
                raise RefusedError.naming(
                    literal(
                        f"{other.path} and {unit.path} are both step {unit.step}: two runs may share "
                        f"{unit.run or 'the run'}"
                    ),
                    hint="prune the runs separately, or pass {ignore_time_order} if this is one run",
                )
    latest_seen: Unit | None = None
    for unit in dated:
        if (
            latest_seen
            and (latest_seen.newest_mtime or 0) - (unit.newest_mtime or 0) > ORDER_TOLERANCE_SECONDS
        ):
            raise RefusedError.naming(
                literal(
                    f"step order and time order disagree: {latest_seen.path} (step {latest_seen.step}) was "
                    f"written after {unit.path} (step {unit.step}); two runs may share "
                    f"{posixpath.dirname(unit.path) or 'the run'}"
                ),
                hint="prune the runs separately, or pass {ignore_time_order} if the files were copied",
            )
        if latest_seen is None or (unit.newest_mtime or 0) >= (latest_seen.newest_mtime or 0):
            latest_seen = unit


def plan_prune(
    location: Location,
    policy: Policy,
    *,
    settle_seconds: float,
    metric_file: Location | None = None,
    step_key: str = "step",
    max_delete: int | None = None,
    max_delete_bytes: int | None = None,
    check_time_order: bool = True,
    incomplete_older_than: float | None = None,
    now: float | None = None,
) -> PrunePlan:
    """Decide what to delete; raises RefusedError (exit 4), MetricSourceError (exit 7) or
    NothingRecognisedError (exit 3), changes nothing."""
    scan = scan_run(location, settle_seconds=settle_seconds, now=now)
    if incomplete_older_than is not None:
        decisions = decide_incomplete(scan.units, incomplete_older_than, scan.scanned_at)
        resume = _being_deleted(scan.units)
        plan = PrunePlan(
            location.url, policy, tuple(decisions), resume, tuple(scan.warnings), scan.scanned_at
        )
        _check_limits(plan, max_delete, max_delete_bytes)
        return plan
    _check_one_run(scan)
    metrics = None
    notes = [*scan.warnings]
    ranked = [u for u in scan.units if u.is_ranked]
    if any(u.ordinal == "save" for u in ranked):
        by_step = [
            setting
            for setting, used in (
                ("keep_every_steps", policy.keep_every_steps),
                ("keep_steps", policy.keep_steps),
                ("pin", policy.pinned_steps),
                ("metric_file", metric_file),
            )
            if used
        ]
        if by_step:
            raise UsageError.naming(
                f"the checkpoints of {literal(location.url)} are numbered by save, not by training step "
                f"(Accelerate's checkpoint_N), so {{{by_step[0]}}} cannot name them",
                hint="use {keep_last}, {keep_total} or {keep_within}, or a .ckptctl-keep file to pin one",
            )
    if policy.keep_best and policy.metric:
        if metric_file is not None:
            lightning = any(u.layout is Layout.LIGHTNING for u in ranked)
            loaded = load_metric_file(metric_file, policy.metric, step_key, lightning_run=lightning)
            metrics = loaded.by_step
            matched = [u for u in ranked if u.step in metrics]
            if not matched:
                steps = sorted(metrics)
                raise MetricSourceError.naming(
                    literal(
                        f"metric file {metric_file.url} matches no checkpoint of {location.url}: its "
                        f"{policy.metric!r} rows are at steps {steps[0]}..{steps[-1]}"
                        + (f" (+{loaded.step_offset}, Lightning's rule)" if loaded.step_offset else "")
                        + f", the checkpoints at {_step_range(ranked)}"
                    ),
                    url=metric_file.url,
                    hint="check {step_key}, and that the file belongs to this run",
                )
            if loaded.step_offset:
                notes.append(
                    f"{metric_file.url}: Lightning's log; its row at step s is the validation of checkpoint "
                    f"step s+{loaded.step_offset}"
                )
            notes.append(f"{metric_file.url}: {len(matched)} of {len(ranked)} checkpoints have a value")
        elif not any(policy.metric in u.metrics for u in ranked):
            looked = sorted({u.metric_source for u in scan.units if u.metric_source}) or ["nowhere"]
            raise MetricSourceError.naming(
                literal(
                    f"no checkpoint of {location.url} has a value for {policy.metric!r} (looked in: "
                    f"{', '.join(looked)}; trainer_state.json log_history and name=value in names)"
                ),
                hint="pass {metric_file} PATH (CSV or JSON Lines) with {step_key}",
            )
    if check_time_order:
        _check_order(scan.units)
    decisions, units = _decide_confirmed(location, scan.units, policy, metrics, notes)
    resume = _being_deleted(units)
    if any(r.startswith("tie@") for d in decisions for r in d.reasons):
        notes.append(f"ties at place {policy.keep_best} for {policy.metric}: all tied checkpoints are kept")
    plan = PrunePlan(location.url, policy, tuple(decisions), resume, tuple(notes), scan.scanned_at)
    _check_limits(plan, max_delete, max_delete_bytes)
    return plan


def _decide_confirmed(
    location: Location,
    units: Sequence[Unit],
    policy: Policy,
    metrics: dict[int, float] | None,
    notes: list[str],
) -> tuple[list[Decision], list[Unit]]:
    """Decide, read the markers of the units the decision keeps, and decide again until every kept unit's
    marker has been read: a broken one drops out and the next whole checkpoint takes its place. Each marker
    is read at most once."""
    current = list(units)
    while True:
        decisions = decide(current, policy, metrics)
        unread = {d.unit.path for d in decisions if d.action == "keep" and marker_checkable(d.unit)}
        unread -= {u.path for u in current if u.marker_checked}
        if not unread:
            return decisions, current
        picked = [u for u in current if u.path in unread]
        confirmed, warnings = confirm_markers(location, picked)
        notes.extend(warnings)
        by_path = {u.path: u for u in confirmed}
        for unit in confirmed:
            if unit.status is not Status.COMPLETE:
                notes.append(f"{unit.path}: {unit.reason}; not counted")
        # A unit whose read failed is no longer checkable (not complete), so the loop ends.
        current = [by_path.get(u.path, u) for u in current]


def _being_deleted(units: Sequence[Unit]) -> tuple[Unit, ...]:
    """Units an interrupted prune's journal names and nobody has written to since (a unit touched again within
    the settle time is in progress, and left alone)."""
    return tuple(u for u in units if u.journaled and u.status is Status.INCOMPLETE)


def _step_range(units: Sequence[Unit]) -> str:
    steps = sorted(u.step for u in units if u.step is not None)
    return f"steps {steps[0]}..{steps[-1]}" if steps else "no step"


def _check_one_run(scan: RunScan) -> None:
    """Rule 4 again, by layout: checkpoints in different folders belong to different runs (Lightning's
    ``version_N/``, sibling HF output folders), whose steps restart; ranking them together deletes the newer
    run. And a run with nothing retention can rank is not a run ckptctl understands: say so (exit 3) rather
    than report "nothing to delete"."""
    runs = scan.runs
    if len(runs) > 1:
        shown = ", ".join(r or "." for r in runs[:6]) + (
            f" and {len(runs) - 6} more" if len(runs) > 6 else ""
        )
        raise RefusedError(
            f"{scan.url} holds {len(runs)} runs ({shown}); prune one run at a time",
            url=scan.url,
            hint=f"e.g. ckptctl prune {scan.url.rstrip('/')}/{next(r for r in runs if r)} ...; "
            "ckptctl list shows each run",
        )
    if not runs:
        found = sorted({u.layout.value for u in scan.recognised}) or ["nothing recognised"]
        raise NothingRecognisedError(
            f"no checkpoint in {scan.url} has a step or save number to rank by (found: {', '.join(found)})",
            url=scan.url,
            hint="prune ranks checkpoints by step; point it at the folder that holds them",
        )


def _check_limits(plan: PrunePlan, max_delete: int | None, max_delete_bytes: int | None) -> None:
    count = len(plan.to_delete)
    if max_delete is not None and count > max_delete:
        raise RefusedError.naming(
            f"the plan deletes {count} checkpoints, more than {{max_delete}} {max_delete}"
        )
    if max_delete_bytes is not None and plan.bytes_to_free > max_delete_bytes:
        raise RefusedError.naming(
            f"the plan frees {format_bytes(plan.bytes_to_free)}, more than {{max_delete_bytes}} "
            f"{format_bytes(max_delete_bytes)}"
        )


@dataclass
class PruneResult:
    deleted: list[Unit] = field(default_factory=list)
    skipped: list[tuple[Unit, str]] = field(default_factory=list)
    failed: list[tuple[Unit, list[str]]] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(u.total_bytes for u in self.deleted)


def _fingerprint(unit: Unit) -> set[tuple[str, int, float | None, str | None]]:
    return {(f.path, f.size, f.mtime, f.etag) for f in unit.files}


def _revalidate(plan: PrunePlan, fresh: RunScan) -> tuple[list[Unit], list[tuple[Unit, str]]]:
    """Rule 5: a unit is deleted only if its status, its files and their sizes and times are still as planned,
    and nothing names it."""
    now_units = {u.path: u for u in fresh.units}
    keep: list[Unit] = []
    skipped: list[tuple[Unit, str]] = []
    for unit in plan.to_delete:
        current = now_units.get(unit.path)
        if current is None:
            skipped.append((unit, "gone since the plan"))
        elif current.status is not unit.status:
            skipped.append((unit, f"now {current.status.value}: {current.reason}"))
        elif current.pointers:
            skipped.append((unit, f"now named by {', '.join(current.pointers)}"))
        elif _fingerprint(current) != _fingerprint(unit):
            skipped.append((unit, "its files changed since the plan"))
        else:
            keep.append(current)
    return keep, skipped


def execute(
    plan: PrunePlan,
    location: Location,
    *,
    settle_seconds: float,
    on_event: Callable[[str, Unit, str], None] | None = None,
) -> PruneResult:
    """Delete what the plan says, in the order that survives ``kill -9`` (journal, markers, data, journal).

    The caller holds the run lock (``storage.lock.run_lock``) across ``plan_prune`` and ``execute``.
    """
    emit = on_event or (lambda kind, unit, detail: None)
    result = PruneResult()
    fresh = scan_run(location, settle_seconds=settle_seconds, require_units=False)
    doomed, result.skipped = _revalidate(plan, fresh)
    for unit, why in result.skipped:
        emit("skipped", unit, why)
    doomed += [u for u in fresh.units if u.path in {r.path for r in plan.resume}]
    if not doomed:
        return result
    location.write_bytes(JOURNAL_NAME, encode_journal([u.path for u in doomed], time.time()))
    markers = [f.path for u in doomed for f in u.files if posixpath.basename(f.path) in COMPLETION_MARKERS]
    location.delete_files(markers, verify=False)
    marker_set = set(markers)
    data = [f.path for u in doomed for f in u.files if f.path not in marker_set]
    # One verifying listing for both batches: what is still there failed, marker or data.
    location.delete_files(data, verify=False)
    left = set(location.still_present(markers + data))
    unfinished: list[str] = []
    for unit in doomed:
        remaining = sorted(f.path for f in unit.files if f.path in left)
        if remaining:
            result.failed.append((unit, remaining))
            unfinished.append(unit.path)
            emit("error", unit, f"{len(remaining)} file(s) could not be deleted, e.g. {remaining[0]}")
        else:
            if unit.kind == "dir" and unit.path:
                location.remove_empty_folder(unit.path)
            result.deleted.append(unit)
            emit("deleted", unit, "")
    if unfinished:
        location.write_bytes(JOURNAL_NAME, encode_journal(unfinished, time.time()))
    else:
        location.delete_files([JOURNAL_NAME], verify=False)
    return result
