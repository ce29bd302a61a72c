"""What ``ckptctl list`` shows: a scan, filtered and ordered, as records for the table and for ``--json``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptctl.catalog.model import RunScan, Status, Unit
from ckptctl.catalog.scan import scan_run
from ckptctl.errors import UsageError
from ckptctl.humanize import parse_duration
from ckptctl.storage.location import Location

SORT_KEYS = ("step", "size", "age", "name", "status")
# Logged numbers that describe the evaluation run rather than the model: hidden unless asked for.
_EVAL_BOOKKEEPING = ("_runtime", "_samples_per_second", "_steps_per_second")
_EVAL_PREFIXES = ("eval", "val", "test")


def is_evaluation_metric(name: str) -> bool:
    """What ``list`` shows by default: evaluation results (``eval_loss``, ``val_acc``, ``test/loss``), not the
    training log (``loss``, ``grad_norm``, ``learning_rate``) nor the evaluation's own timings."""
    lowered = name.lower()
    return lowered.startswith(_EVAL_PREFIXES) and not lowered.endswith(_EVAL_BOOKKEEPING)


@dataclass(frozen=True)
class ListOptions:
    sort_key: str = "step"
    descending: bool = False
    limit: int | None = None
    statuses: frozenset[Status] = frozenset()
    settle_seconds: float = 600.0
    metrics: frozenset[str] | None = frozenset()
    """Metric names to show; empty: evaluation metrics and those in names; None: every metric."""

    @classmethod
    def parse(
        cls, *, sort: str, limit: int | None, statuses: Sequence[str], settle: str, metrics: str = ""
    ) -> ListOptions:
        """Validate the command-line spellings (``--sort size:desc``, ``--status incomplete,in-progress``,
        ``--metrics all`` or ``--metrics eval_loss,loss``)."""
        key, _, direction = sort.partition(":")
        if key not in SORT_KEYS or direction not in ("", "asc", "desc"):
            raise UsageError(
                f"--sort takes one of {', '.join(SORT_KEYS)}, optionally with :asc or :desc; got {sort!r}"
            )
        wanted: set[Status] = set()
        for item in statuses:
            for name in filter(None, (part.strip() for part in item.split(","))):
                try:
                    wanted.add(Status(name))
                except ValueError:
                    names = ", ".join(s.value for s in Status)
                    raise UsageError(f"--status takes {names}; got {name!r}") from None
        shown: frozenset[str] | None = (
            None
            if metrics.strip() == "all"
            else frozenset(filter(None, (m.strip() for m in metrics.split(","))))
        )
        return cls(key, direction == "desc", limit, frozenset(wanted), parse_duration(settle), shown)

    def shown_metrics(self, unit: Unit) -> dict[str, float]:
        if self.metrics is None:
            return dict(unit.metrics)
        if self.metrics:
            return {k: v for k, v in unit.metrics.items() if k in self.metrics}
        if unit.metric_source in ("name", "ckpt"):
            return dict(unit.metrics)
        return {k: v for k, v in unit.metrics.items() if is_evaluation_metric(k)}


def unit_to_dict(unit: Unit, now: float) -> dict[str, Any]:
    """A unit as plain JSON data (shared by ``list --json`` and other commands' results)."""
    return {
        "path": unit.path,
        "name": unit.name,
        "run": unit.run,
        "step": unit.step,
        "step_kind": unit.ordinal,
        "counted": unit.counted,
        "being_deleted": unit.journaled,
        "epoch": unit.epoch,
        "layout": unit.layout.value,
        "kind": unit.kind,
        "status": unit.status.value,
        "reason": unit.reason,
        "bytes": unit.total_bytes,
        "files": len(unit.files),
        "newest_mtime": unit.newest_mtime,
        "age_seconds": None if unit.newest_mtime is None else round(now - unit.newest_mtime, 3),
        "pointers": list(unit.pointers),
        "metrics": dict(unit.metrics),
        "metric_source": unit.metric_source,
    }


@dataclass(frozen=True)
class Listing:
    url: str
    now: float
    units: tuple[Unit, ...]
    scan: RunScan
    options: ListOptions = ListOptions()

    @property
    def runs(self) -> list[dict[str, Any]]:
        """Each run the scan found (several when a folder holds Lightning versions or HF output folders)."""
        found = []
        for run in self.scan.runs:
            units = [u for u in self.scan.units if u.run == run and u.is_ranked]
            complete = [u for u in units if u.is_complete]
            found.append(
                {
                    "path": run,
                    "units": len(units),
                    "complete": len(complete),
                    "bytes": sum(u.total_bytes for u in units),
                    "newest_step": max((u.step or 0 for u in complete), default=None),
                }
            )
        return found

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.scan.warnings

    @property
    def summary(self) -> dict[str, int]:
        every = self.scan.units
        return {
            "units": len(every),
            "shown": len(self.units),
            "complete": sum(1 for u in every if u.is_complete),
            "bytes": sum(u.total_bytes for u in every),
            "files": self.scan.file_count,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.url,
            "units": [
                {**unit_to_dict(u, self.now), "metrics": self.options.shown_metrics(u)} for u in self.units
            ],
            "runs": self.runs,
            "pointers": [
                {"name": p.name, "source": p.source, "target": p.target} for p in self.scan.pointers
            ],
            "warnings": list(self.warnings),
            "summary": self.summary,
        }


def _sort_value(unit: Unit, key: str, now: float) -> tuple[Any, ...]:
    if key == "size":
        return (unit.total_bytes, unit.path)
    if key == "age":
        return (now - unit.newest_mtime if unit.newest_mtime is not None else float("inf"), unit.path)
    if key == "name":
        return (unit.path,)
    if key == "status":
        return (unit.status.value, unit.step if unit.step is not None else -1, unit.path)
    return (unit.step is None, unit.step if unit.step is not None else 0, unit.epoch or 0, unit.path)


def list_run(location: Location, options: ListOptions) -> Listing:
    """Scan the run and return its units filtered and ordered as ``options`` say."""
    now = time.time()
    scan = scan_run(location, settle_seconds=options.settle_seconds, now=now)
    units = [u for u in scan.units if not options.statuses or u.status in options.statuses]
    units.sort(key=lambda u: _sort_value(u, options.sort_key, now), reverse=options.descending)
    if options.limit is not None:
        units = units[: options.limit]
    return Listing(url=location.url, now=now, units=tuple(units), scan=scan, options=options)
