"""Prune by written-down rules: one run (``prune RUN``) or every run under a root (``prune ROOT --each-run``, the
cron line for a cluster), each by its own ``.ckptctl.toml`` settings merged with the flags.

Each run is planned and executed on its own, under its own lock, with ``plan.execute``'s crash-safe order: a
run that fails (locked, metric missing, refused by a safety rule, a broken policy file) is reported and the
others are still done, and a ``kill -9`` leaves every run either untouched, finished, or journaled for the next
run to finish. Cost: one walk of the root to find the runs, then per run one policy lookup (memoised per
folder), one walk to plan and one to re-validate (``execute``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptctl.catalog.model import Unit, policy_files_in
from ckptctl.catalog.scan import DEFAULT_SETTLE_SECONDS, scan_run
from ckptctl.errors import CkptctlError, NothingRecognisedError, PartialFailureError
from ckptctl.retention.plan import PrunePlan, PruneResult, execute, plan_prune
from ckptctl.retention.policy import decide
from ckptctl.retention.policy_files import PolicyFinder, RunRules, Setting, merge_settings
from ckptctl.storage.location import Location
from ckptctl.storage.lock import run_lock

RunAction = Literal["pruned", "nothing-to-delete", "planned", "no-policy", "failed"]
"""``pruned`` (deleted something), ``nothing-to-delete``, ``planned`` (dry run), ``no-policy`` (no rule from a
file or a flag: left alone), ``failed`` (reported; the other runs still done)."""


@dataclass(frozen=True)
class PruneSettings:
    """What every run shares: the flags given (as settings), how the command spells them, and the switches
    that have no file key."""

    flags: Mapping[str, Setting] = field(default_factory=dict)
    flag_names: Mapping[str, str] = field(default_factory=dict)
    pinned_steps: tuple[int, ...] = ()
    keep_without_metric: bool = True
    check_time_order: bool = True
    storage_options: Mapping[str, Any] = field(default_factory=dict)


def rules_for_run(
    run: Location, settings: PruneSettings, finder: PolicyFinder, root: Location | None = None
) -> RunRules:
    """The run's merged settings: its policy files (up to ``root``, or the top of the store), then the flags."""
    merged = merge_settings(finder.chain(run, root), settings.flags)
    return RunRules(merged, settings.pinned_steps, settings.keep_without_metric)


def settle_seconds(rules: RunRules) -> float:
    return float(rules.value("settle", DEFAULT_SETTLE_SECONDS))


def plan_run(run: Location, rules: RunRules, settings: PruneSettings) -> PrunePlan:
    """``plan_prune`` with the run's rules. Its errors name each setting as the user wrote it: the flag, or the
    key and the file line it came from."""
    try:
        return plan_prune(
            run,
            rules.policy(),
            settle_seconds=settle_seconds(rules),
            metric_file=rules.metric_file(run, settings.storage_options),
            step_key=rules.value("step-key", "step"),
            max_delete=rules.value("max-delete"),
            max_delete_bytes=rules.value("max-delete-bytes"),
            check_time_order=settings.check_time_order,
        )
    except CkptctlError as exc:
        raise exc.for_flags(rules.names(settings.flag_names)) from None


@dataclass
class RunOutcome:
    run: str
    """Relative to the root (``""``: the root itself is the run)."""
    action: RunAction
    rules: RunRules | None = None
    plan: PrunePlan | None = None
    result: PruneResult | None = None
    error: CkptctlError | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "action": self.action,
            "rules": self.rules.describe() if self.rules else [],
            "to_delete": [u.path for u in self.plan.to_delete] if self.plan else [],
            "bytes_to_free": self.plan.bytes_to_free if self.plan else 0,
            "deleted": [u.path for u in self.result.deleted] if self.result else [],
            "freed_bytes": self.result.freed_bytes if self.result else 0,
            "error": {"code": self.error.code, "message": self.error.message} if self.error else None,
        }


@dataclass
class EachRunResult:
    root: str
    outcomes: list[RunOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]


@dataclass(frozen=True)
class PolicyPreview:
    """What a run's rules would delete, judged from a listing alone (``runs``): an estimate; ``prune --dry-run``
    reads the markers and metric files and gives the plan itself."""

    rules: RunRules | None
    checkpoints: int = 0
    bytes: int = 0
    error: CkptctlError | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": self.rules.describe() if self.rules else [],
            "would_delete": self.checkpoints,
            "would_free_bytes": self.bytes,
            "error": {"code": self.error.code, "message": self.error.message} if self.error else None,
        }


def preview_policies(
    root: Location,
    runs: Mapping[str, Sequence[Unit]],
    policy_files: frozenset[str],
    settings: PruneSettings | None = None,
) -> dict[str, PolicyPreview]:
    """For each run (relative to ``root``) its rules and what they would free; a broken policy file is that
    run's error. ``policy_files``: those the listing of ``root`` holds, so only they are read. No metric file
    is read, so metric rules keep what has no value (never more deleted)."""
    finder, settings = PolicyFinder((root, policy_files)), settings or PruneSettings()
    previews: dict[str, PolicyPreview] = {}
    for rel, units in runs.items():
        try:
            rules = rules_for_run(root.child(rel) if rel else root, settings, finder, root)
            if not rules.has_keep_rule:
                previews[rel] = PolicyPreview(rules)
                continue
            doomed = [d.unit for d in decide(units, rules.policy()) if d.action == "delete"]
        except CkptctlError as exc:
            previews[rel] = PolicyPreview(None, error=exc.for_flags(settings.flag_names))
            continue
        previews[rel] = PolicyPreview(rules, len(doomed), sum(u.total_bytes for u in doomed))
    return previews


def find_runs(root: Location) -> tuple[list[str], frozenset[str]]:
    """Every folder under ``root`` that holds a sequence of ranked checkpoints, and the policy files under it:
    one listing walk, no file opened (each run is scanned for real, under its lock, when it is planned)."""
    entries = root.walk()
    scan = scan_run(root, settle_seconds=0, require_units=False, entries=entries, read_units=False)
    runs = list(scan.runs)
    if not runs:
        raise NothingRecognisedError(
            f"no run under {root.url}: no folder holds checkpoints with a step",
            url=root.url,
            hint="point --each-run at the folder above the runs (e.g. /nvme/ckpt or s3://bucket/runs)",
        )
    return runs, policy_files_in(entries)


def prune_each_run(
    root: Location,
    settings: PruneSettings,
    *,
    dry_run: bool,
    on_outcome: Callable[[RunOutcome], None] | None = None,
    on_event: Callable[[str, str, Unit, str], None] | None = None,
) -> EachRunResult:
    """Plan (``dry_run``) or prune every run under ``root`` by its own rules; never raises for one run's
    failure. ``on_event(kind, run, unit, detail)`` reports each deletion as ``execute`` does."""
    runs, policy_files = find_runs(root)
    finder = PolicyFinder((root, policy_files))
    result = EachRunResult(root.url)
    for rel in runs:
        run = root.child(rel) if rel else root
        outcome = _one_run(rel, run, root, settings, finder, dry_run=dry_run, on_event=on_event)
        result.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return result


def _one_run(
    rel: str,
    run: Location,
    root: Location,
    settings: PruneSettings,
    finder: PolicyFinder,
    *,
    dry_run: bool,
    on_event: Callable[[str, str, Unit, str], None] | None,
) -> RunOutcome:
    try:
        rules = rules_for_run(run, settings, finder, root)
    except CkptctlError as exc:
        return RunOutcome(rel, "failed", error=exc)
    if not rules.has_keep_rule:
        return RunOutcome(rel, "no-policy", rules)
    try:
        if dry_run:
            return RunOutcome(rel, "planned", rules, plan_run(run, rules, settings))
        with run_lock(run) as lease:
            plan = plan_run(run, rules, settings)
            if not plan.to_delete and not plan.resume:
                return RunOutcome(rel, "nothing-to-delete", rules, plan)

            def emit(kind: str, unit: Unit, detail: str) -> None:
                if on_event is not None:
                    on_event(kind, rel, unit, detail)

            lease.check()
            done = execute(plan, run, settle_seconds=settle_seconds(rules), on_event=emit)
    except CkptctlError as exc:
        return RunOutcome(rel, "failed", rules, error=exc)
    if done.failed:
        error = PartialFailureError(
            f"{len(done.failed)} checkpoint(s) could not be fully deleted; a re-run finishes them",
            url=run.url,
        )
        return RunOutcome(rel, "failed", rules, plan, done, error)
    return RunOutcome(rel, "pruned", rules, plan, done)
