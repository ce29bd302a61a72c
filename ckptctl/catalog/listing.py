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
from ckptctl.storage.location import Location, parse_storage_options

SORT_KEYS = ("step", "size", "age", "name", "status")


@dataclass(frozen=True)
class ListOptions:
    sort_key: str = "step"
    descending: bool = False
    limit: int | None = None
    statuses: frozenset[Status] = frozenset()
    settle_seconds: float = 600.0

    @classmethod
    def parse(cls, *, sort: str, limit: int | None, statuses: Sequence[str], settle: str) -> ListOptions:
        """Validate the command-line spellings (``--sort size:desc``, ``--status incomplete,in-progress``)."""
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
        return cls(key, direction == "desc", limit, frozenset(wanted), parse_duration(settle))


def unit_to_dict(unit: Unit, now: float) -> dict[str, Any]:
    """A unit as plain JSON data (shared by ``list --json`` and other commands' results)."""
    return {
        "path": unit.path,
        "name": unit.name,
        "step": unit.step,
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
            "units": [unit_to_dict(u, self.now) for u in self.units],
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


def list_run(url: str, options: ListOptions, *, storage_options: Sequence[str] = ()) -> Listing:
    """Scan the run at ``url`` and return its units filtered and ordered as ``options`` say."""
    location = Location.from_url(url, parse_storage_options(storage_options))
    now = time.time()
    scan = scan_run(location, settle_seconds=options.settle_seconds, now=now)
    units = [u for u in scan.units if not options.statuses or u.status in options.statuses]
    units.sort(key=lambda u: _sort_value(u, options.sort_key, now), reverse=options.descending)
    if options.limit is not None:
        units = units[: options.limit]
    return Listing(url=location.url, now=now, units=tuple(units), scan=scan)
