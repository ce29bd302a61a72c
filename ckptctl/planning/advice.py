"""``advise``: how often a run should save, from what its files measure and what is assumed about failures.

Cost: one catalog scan of the run (one listing walk), plus one ``statvfs`` for a local run's free space.
Nothing is read from any checkpoint.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ckptctl.catalog.scan import scan_run
from ckptctl.errors import UsageError
from ckptctl.humanize import parse_duration, parse_size
from ckptctl.planning import interval as model
from ckptctl.planning.measure import Input, RunMeasurement, measure_saves
from ckptctl.storage.location import Location, parse_storage_options

DAY = 86_400.0
HIGH_LOSS = 0.10
"""A loss at the suggested interval worth a note: no interval helps much, only a cheaper save does."""
SLOWDOWN = 0.25
"""A fall in write bandwidth from the first checkpoint to the last worth a note."""


def parse_fraction(text: str) -> float:
    """``5%``, ``0.05`` -> 0.05: an overhead budget, strictly between 0 and 1."""
    found = re.fullmatch(r"\s*(\d{1,6}(?:\.\d{1,9})?)\s*(%?)\s*", text)
    value = (float(found.group(1)) / (100 if found.group(2) else 1)) if found else math.nan
    if not 0 < value < 1:
        raise UsageError(f"--max-overhead takes a share of the time such as 5% or 0.05; got {text[:40]!r}")
    return value


@dataclass(frozen=True)
class AdviceOptions:
    """What the user gave; ``None`` means measure, infer or assume it."""

    mtbf: float | None = None
    gpus: int | None = None
    restart_cost: float | None = None
    save_cost: float | None = None
    max_overhead: float | None = None
    """None: CheckFreq's default, 5 %."""
    keep_last: int | None = None
    capacity: int | None = None
    settle_seconds: float = 600.0

    @classmethod
    def parse(
        cls,
        *,
        mtbf: str | None = None,
        gpus: int | None = None,
        restart_cost: str | None = None,
        save_cost: str | None = None,
        max_overhead: str | None = None,
        keep_last: int | None = None,
        capacity: str | None = None,
        settle: str = "10m",
    ) -> AdviceOptions:
        """Validate the command-line spellings; a zero MTBF or save cost, or a negative one, is a usage error."""
        if mtbf is not None and gpus is not None:
            raise UsageError("give --mtbf or --gpus, not both (--gpus derives an MTBF)")
        durations = {"--mtbf": mtbf, "--save-cost": save_cost}
        parsed = {
            flag: parse_duration(text) if text is not None else None for flag, text in durations.items()
        }
        for flag, value in parsed.items():
            if value is not None and value <= 0:
                raise UsageError(
                    f"{flag} must be a positive duration (e.g. 12h, 90m), got {durations[flag]!r}"
                )
        if gpus is not None and gpus < 1:
            raise UsageError(f"--gpus must be at least 1, got {gpus}")
        return cls(
            mtbf=parsed["--mtbf"],
            gpus=gpus,
            restart_cost=parse_duration(restart_cost) if restart_cost is not None else None,
            save_cost=parsed["--save-cost"],
            max_overhead=parse_fraction(max_overhead) if max_overhead is not None else None,
            keep_last=keep_last,
            capacity=parse_size(capacity) if capacity is not None else None,
            settle_seconds=parse_duration(settle),
        )


@dataclass(frozen=True)
class Interval:
    """One candidate interval: compute time between saves, and the same in steps."""

    rule: str
    seconds: float
    steps: int
    loss: float | None
    """Expected fraction of time lost at this interval (None without an MTBF)."""

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "seconds": self.seconds, "steps": self.steps, "expected_loss": self.loss}


@dataclass(frozen=True)
class Advice:
    """The advice for one run: labelled inputs, candidate intervals, the storage they take, what is missing."""

    url: str
    measurement: RunMeasurement
    inputs: dict[str, Input]
    current: Interval
    young: Interval | None
    daly: Interval | None
    overhead: Interval | None
    suggested: Interval | None
    storage: dict[str, Any]
    needs: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())
    """What the figures imply beyond the interval (a loss no interval fixes, a slowing filesystem)."""

    def to_dict(self) -> dict[str, Any]:
        def interval(found: Interval | None) -> dict[str, Any] | None:
            return found.to_dict() if found is not None else None

        m = self.measurement
        return {
            "url": self.url,
            "inputs": {name: i.to_dict() for name, i in self.inputs.items()},
            "evidence": [e.to_dict() for e in m.evidence],
            "intervals": {
                "current": interval(self.current),
                "young": interval(self.young),
                "daly": interval(self.daly),
                "overhead_floor": interval(self.overhead),
                "suggested": interval(self.suggested),
            },
            "storage": self.storage,
            "saves": [s.to_dict() for s in m.saves],
            "needs": list(self.needs),
            "notes": list(self.notes),
        }


def _mtbf(options: AdviceOptions, m: RunMeasurement) -> Input | None:
    """The given MTBF, else one derived from ``--gpus`` at Llama 3's rate, else the run's own failure signs."""
    if options.mtbf is not None:
        return Input("mtbf", options.mtbf, "s", "given", "--mtbf")
    if options.gpus is not None:
        return Input(
            "mtbf",
            model.mtbf_for_gpus(options.gpus),
            "s",
            "assumed",
            f"{options.gpus} GPUs at {model.GPU_RATE_SOURCE}",
        )
    if m.evidence and m.span_seconds > 0:
        return Input(
            "mtbf",
            m.span_seconds / len(m.evidence),
            "s",
            "inferred",
            f"{len(m.evidence)} sign(s) of failure in {m.span_seconds / 3600:.3g} h of saves (one crash may "
            "leave several, so this errs short)",
        )
    return None


def _save_cost(options: AdviceOptions, m: RunMeasurement) -> Input | None:
    """δ: the given save cost, else the measured write time (a synchronous save blocks for all of it)."""
    if options.save_cost is not None:
        return Input("save_cost", options.save_cost, "s", "given", "--save-cost")
    if m.write_time is None:
        return None
    return Input("save_cost", m.write_time.value, "s", "measured", "the write time (synchronous saves block)")


def _restart_cost(options: AdviceOptions, m: RunMeasurement) -> Input:
    """Given, else what the run's own gaps cost (an upper bound: it includes redone work), else none."""
    if options.restart_cost is not None:
        return Input("restart_cost", options.restart_cost, "s", "given", "--restart-cost")
    if m.recovery is not None:
        return replace(m.recovery, name="restart_cost")
    return Input(
        "restart_cost", 0.0, "s", "assumed", "not counted; pass --restart-cost to add it to the loss"
    )


def _capacity(location: Location, options: AdviceOptions) -> Input | None:
    if options.capacity is not None:
        return Input("capacity", float(options.capacity), "B", "given", "--capacity")
    if location.is_local:
        free = shutil.disk_usage(location.full_path()).free
        return Input("capacity", float(free), "B", "measured", "free space on the run's filesystem")
    return Input(
        "capacity",
        None,
        "B",
        "assumed",
        "object stores (and memory://) report no free space; pass --capacity",
    )


def _storage(
    m: RunMeasurement,
    capacity: Input | None,
    keep_last: int | None,
    save_cost: float,
    shown: dict[str, Interval],
) -> dict[str, Any]:
    """Bytes on the tier now, how many saves of this size fit, what keep-last N holds and how much history it
    spans, and the bytes written per day, at each interval in ``shown``."""
    size = m.size.value or 0.0
    storage: dict[str, Any] = {
        "run_bytes": sum(s.bytes for s in m.saves),
        "checkpoints_that_fit": int(capacity.value // size) if capacity and capacity.value and size else None,
        "written_per_day": {k: size * DAY / (i.seconds + save_cost) for k, i in shown.items()},
    }
    if keep_last is not None:
        storage["keep_last"] = {
            "count": keep_last,
            "bytes": keep_last * size,
            "history_seconds": {k: keep_last * (i.seconds + save_cost) for k, i in shown.items()},
        }
    return storage


def advise(m: RunMeasurement, options: AdviceOptions, *, url: str, capacity: Input | None = None) -> Advice:
    """Join a run's measurement with the failure assumptions: pure, so tests can feed it any measurement."""
    step_time = m.step_time.value or 0.0
    mtbf, save_cost, restart = _mtbf(options, m), _save_cost(options, m), _restart_cost(options, m)
    budget = (
        Input("max_overhead", options.max_overhead, "fraction", "given", "--max-overhead")
        if options.max_overhead is not None
        else Input(
            "max_overhead", model.DEFAULT_MAX_OVERHEAD, "fraction", "assumed", "CheckFreq's default budget"
        )
    )
    q = budget.value or model.DEFAULT_MAX_OVERHEAD
    delta = save_cost.value if save_cost is not None and save_cost.value else 0.0
    needs = []
    if save_cost is None:
        needs.append(
            "the save time: every checkpoint is one file, or its files share one time; pass --save-cost"
        )
    if mtbf is None:
        needs.append("a failure rate: pass --mtbf DURATION or --gpus N (no failure shows in the run)")

    def at(rule: str, seconds: float) -> Interval:
        loss = (
            model.expected_loss(seconds, delta, mtbf.value, restart.value or 0.0)
            if mtbf and mtbf.value and delta
            else None
        )
        return Interval(rule, seconds, model.interval_in_steps(seconds, step_time), loss)

    current = at("current", int(m.interval_steps.value or 0) * step_time)
    young = daly = overhead = suggested = None
    if delta:
        overhead = at(f"saving under {q:.0%}", model.overhead_floor(delta, q))
        if mtbf is not None and mtbf.value:
            young = at("young", model.young_interval(delta, mtbf.value))
            daly = at("daly", model.daly_interval(delta, mtbf.value))
            suggested = daly if daly.seconds >= overhead.seconds else overhead
    inputs = {i.name: i for i in m.inputs()}
    for extra in (save_cost, mtbf, restart, budget, capacity):
        if extra is not None:
            inputs[extra.name] = extra
    return Advice(
        url=url,
        measurement=m,
        inputs=inputs,
        current=current,
        young=young,
        daly=daly,
        overhead=overhead,
        suggested=suggested,
        storage=_storage(
            m,
            capacity,
            options.keep_last,
            delta,
            {"current": current, **({"suggested": suggested} if suggested is not None else {})},
        ),
        needs=tuple(needs),
        notes=tuple(_notes(m, suggested)),
    )


def _notes(m: RunMeasurement, suggested: Interval | None) -> list[str]:
    notes = []
    if suggested is not None and suggested.loss is not None and suggested.loss >= HIGH_LOSS:
        notes.append(
            f"even the best interval loses {suggested.loss:.0%} of the time: at this failure rate only a cheaper "
            "save (asynchronous, in-memory or differential checkpoints) or fewer failures help"
        )
    trend = m.bandwidth_trend.value if m.bandwidth_trend is not None else None
    if trend is not None and trend < -SLOWDOWN:
        notes.append(
            f"write bandwidth fell by {-trend:.0%} from the first checkpoint to the last: a filling or degrading "
            "filesystem?"
        )
    return notes


def advise_run(url: str, options: AdviceOptions, *, storage_options: Sequence[str] = ()) -> Advice:
    """Scan the run at ``url``, measure its saves and advise an interval. Raises NotFoundError when the run
    is missing, TooShortToMeasureError when it has fewer than two complete stepped checkpoints."""
    location = Location.from_url(url, parse_storage_options(storage_options))
    scan = scan_run(location, settle_seconds=options.settle_seconds, now=time.time())
    return advise(measure_saves(scan), options, url=location.url, capacity=_capacity(location, options))
