"""What a run's own files say about its saves: size, write time, step rate, interval and signs of failure.

Everything here comes from one catalog scan (``scan_run``: one listing walk, no file is read for it): file sizes
and modification times. A unit's save is taken to run from its oldest file's time to its newest, the completion
marker, which every recognised layout writes last. That is a lower bound on the write time (the first file's
own write is invisible), and copies that reset file times (``cp`` without ``-a``, object-store round trips)
make it meaningless; each figure therefore carries how it was found (:class:`Input`).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ckptctl.catalog.model import RunScan, Status, Unit
from ckptctl.errors import NotFoundError, UsageError

Label = Literal["measured", "inferred", "assumed", "given"]
EvidenceKind = Literal["incomplete", "gap", "step-regression"]

GAP_FACTOR = 3.0
"""A stretch between two saves whose time per step is this many times the usual one is a sign of a failure."""


class TooShortToMeasureError(NotFoundError):
    """A run with fewer than two complete, stepped, time-stamped checkpoints: nothing to measure between."""

    code = "too_short_to_measure"
    default_hint = "run advise again after the next save, or on the folder that holds the run's checkpoints"


@dataclass(frozen=True)
class Input:
    """One figure the advice rests on, with how it was found: ``measured`` from file sizes and times,
    ``inferred`` from signs in the run, ``assumed`` (a published default) or ``given`` on the command line."""

    name: str
    value: float | None
    unit: str
    label: Label
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "label": self.label, "basis": self.basis}


@dataclass(frozen=True)
class Save:
    """One checkpoint as a save: when its files were written and how big it is."""

    path: str
    step: int
    status: Status
    bytes: int
    started: float
    finished: float
    """The newest file's time: the completion marker's, for a complete unit."""
    files: int

    @property
    def write_seconds(self) -> float | None:
        """The spread of its file times; None for a single file, whose write time no listing shows."""
        return self.finished - self.started if self.files > 1 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "step": self.step,
            "status": self.status.value,
            "bytes": self.bytes,
            "started": self.started,
            "finished": self.finished,
            "write_seconds": self.write_seconds,
        }


@dataclass(frozen=True)
class Evidence:
    """A sign that the run failed once: a save cut short, a stretch far slower than usual, or a step written
    after a higher one (a restart from an older checkpoint)."""

    kind: EvidenceKind
    path: str
    step: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "step": self.step, "detail": self.detail}


@dataclass(frozen=True)
class Stretch:
    """Training between two consecutive complete saves (in step order)."""

    before: Save
    after: Save
    is_gap: bool

    @property
    def steps(self) -> int:
        return self.after.step - self.before.step

    @property
    def seconds(self) -> float:
        """Marker to marker: the training time plus the later save's write."""
        return self.after.finished - self.before.finished

    @property
    def step_seconds(self) -> float:
        """Time per step with the later save's write taken out (saves block training when synchronous)."""
        return (self.seconds - (self.after.write_seconds or 0.0)) / self.steps


@dataclass(frozen=True)
class RunMeasurement:
    """What :func:`measure_saves` found, each figure as a labelled :class:`Input`."""

    saves: tuple[Save, ...]
    """Every unit with a step and file times, in step order: complete and incomplete alike."""
    stretches: tuple[Stretch, ...]
    evidence: tuple[Evidence, ...]
    size: Input
    size_trend: Input
    write_time: Input | None
    bandwidth: Input | None
    bandwidth_trend: Input | None
    step_time: Input
    interval_steps: Input
    interval_seconds: Input
    span_seconds: float
    """From the first save's marker to the last one's."""
    recovery: Input | None = None
    """Time lost in the gaps beyond the steps they trained (downtime, restart and redone work): inferred,
    an upper bound of the restart cost; None without a gap."""

    @property
    def complete(self) -> tuple[Save, ...]:
        return tuple(s for s in self.saves if s.status is Status.COMPLETE)

    def inputs(self) -> list[Input]:
        found = [
            self.size,
            self.size_trend,
            self.write_time,
            self.bandwidth,
            self.bandwidth_trend,
            self.step_time,
        ]
        return [i for i in (*found, self.interval_steps, self.interval_seconds) if i is not None]


def _save_of(unit: Unit) -> Save | None:
    times = [f.mtime for f in unit.files if f.mtime is not None]
    if unit.step is None or not times or not unit.is_ranked or unit.ordinal != "step":
        return None
    return Save(unit.path, unit.step, unit.status, unit.total_bytes, min(times), max(times), len(times))


def _one_run(scan: RunScan) -> None:
    if len(scan.runs) > 1:
        names = ", ".join(run or "." for run in scan.runs[:4])
        raise UsageError(
            f"{scan.url} holds several runs ({names}); their steps restart, so advise one run at a time",
            url=scan.url,
            hint=f"ckptctl advise {scan.url.rstrip('/')}/{scan.runs[-1] or '.'}",
        )


def _regressions(saves: Sequence[Save]) -> list[Evidence]:
    """Saves written after a save of a higher step: the trainer went back to an older checkpoint."""
    found: list[Evidence] = []
    highest: Save | None = None
    for save in sorted(saves, key=lambda s: (s.finished, s.step)):
        if highest is not None and save.step < highest.step:
            found.append(
                Evidence(
                    "step-regression",
                    save.path,
                    save.step,
                    f"step {save.step} was written after step {highest.step}: a restart from an older "
                    "checkpoint",
                )
            )
        elif highest is None or save.step > highest.step:
            highest = save
    return found


def _stretches(complete: Sequence[Save]) -> list[Stretch]:
    """Consecutive complete saves whose markers are in time order, with the slow ones marked as gaps."""
    pairs = [(a, b) for a, b in itertools.pairwise(complete) if b.step > a.step and b.finished > a.finished]
    plain = [Stretch(a, b, False) for a, b in pairs]
    if not plain:
        return []
    usual = statistics.median(s.seconds / s.steps for s in plain)
    return [
        Stretch(a, b, s.seconds / s.steps > GAP_FACTOR * usual)
        for (a, b), s in zip(pairs, plain, strict=True)
    ]


def _trend(values: Sequence[float]) -> float:
    """Relative change from the first value to the last (0 when flat or when the first is 0)."""
    return (values[-1] - values[0]) / values[0] if len(values) > 1 and values[0] else 0.0


def measure_saves(scan: RunScan) -> RunMeasurement:
    """Measure a run's saves from its scan. Raises TooShortToMeasureError when fewer than two complete
    checkpoints with steps were written at different times, UsageError when the scan holds several runs."""
    _one_run(scan)
    saves = sorted(
        (s for s in map(_save_of, scan.units) if s is not None), key=lambda s: (s.step, s.finished)
    )
    complete = [s for s in saves if s.status is Status.COMPLETE]
    if len(complete) < 2:
        by_save = sum(1 for u in scan.units if u.is_ranked and u.ordinal == "save")
        why = f" ({by_save} are numbered by save, not by training step)" if by_save else ""
        raise TooShortToMeasureError(
            f"{scan.url} has {len(complete)} complete checkpoint(s) with a step and file times{why}; advise "
            "needs at least two complete checkpoints with steps to measure the interval between them",
            url=scan.url,
        )
    stretches = _stretches(complete)
    if not stretches:
        raise TooShortToMeasureError(
            f"the complete checkpoints of {scan.url} do not follow one another in time (their file times do "
            "not grow with the step: copied without keeping times?); advise needs at least two complete "
            "checkpoints with steps, written at different times",
            url=scan.url,
        )
    steady = [s for s in stretches if not s.is_gap] or stretches
    step_time = statistics.median(s.step_seconds for s in steady)
    if step_time <= 0:
        raise TooShortToMeasureError(
            f"the saves of {scan.url} take as long as the time between them, so no training time is left to "
            "measure a step rate from; advise needs at least two complete checkpoints with steps, written "
            "further apart than one save lasts",
            url=scan.url,
        )
    evidence = [
        Evidence("incomplete", s.path, s.step, "a save cut short (a crash or a kill while saving)")
        for s in saves
        if s.status is Status.INCOMPLETE
    ]
    evidence += [
        Evidence(
            "gap",
            s.after.path,
            s.after.step,
            f"{s.seconds / s.steps:.3g} s per step since step {s.before.step}, over {GAP_FACTOR:g}x the usual "
            "(a stop and a restart?)",
        )
        for s in stretches
        if s.is_gap
    ]
    evidence += _regressions(saves)
    sizes = [float(s.bytes) for s in complete]
    writes = [w for w in (s.write_seconds for s in complete) if w is not None]
    n = len(complete)
    write_time = (
        Input(
            "write_time",
            statistics.median(writes),
            "s",
            "measured",
            f"median spread of file times inside {len(writes)} complete checkpoint(s), marker last "
            "(a lower bound)",
        )
        if writes and max(writes) > 0
        else None
    )
    rates = [s.bytes / w for s in complete if (w := s.write_seconds)]
    bandwidth, bandwidth_trend = (
        (
            Input("bandwidth", statistics.median(rates), "B/s", "measured", "median of size / write time"),
            Input(
                "bandwidth_trend", _trend(rates), "fraction", "measured", "change from the first to the last"
            ),
        )
        if rates
        else (None, None)
    )
    return RunMeasurement(
        saves=tuple(saves),
        stretches=tuple(stretches),
        evidence=tuple(evidence),
        size=Input("size", statistics.median(sizes), "B", "measured", f"median of {n} complete checkpoints"),
        size_trend=Input(
            "size_trend", _trend(sizes), "fraction", "measured", "change in size from the first to the last"
        ),
        write_time=write_time,
        bandwidth=bandwidth,
        bandwidth_trend=bandwidth_trend,
        step_time=Input(
            "step_time",
            step_time,
            "s",
            "measured",
            f"median over {len(steady)} stretch(es) of marker-to-marker time less the save's write, per step",
        ),
        interval_steps=Input(
            "interval_steps",
            statistics.median(s.steps for s in steady),
            "steps",
            "measured",
            "median steps between consecutive complete checkpoints",
        ),
        interval_seconds=Input(
            "interval_seconds",
            statistics.median(s.seconds for s in steady),
            "s",
            "measured",
            "median time between consecutive completion markers",
        ),
        span_seconds=max(s.finished for s in saves) - min(s.finished for s in saves),
        recovery=_recovery(stretches, step_time),
    )


def _recovery(stretches: Sequence[Stretch], step_time: float) -> Input | None:
    """The median time each gap took beyond its steps at the usual rate and its save's write: what a stop
    cost (detecting it, restarting, loading, and the work redone since the last save, which the files cannot
    tell apart). An upper bound of the restart cost; None when no stretch is a gap."""
    lost = [s.seconds - s.steps * step_time - (s.after.write_seconds or 0.0) for s in stretches if s.is_gap]
    if not lost:
        return None
    return Input(
        "recovery",
        max(0.0, statistics.median(lost)),
        "s",
        "inferred",
        f"median time {len(lost)} gap(s) took beyond their steps at the usual rate (downtime, restart and "
        "redone work: an upper bound of the restart cost)",
    )
