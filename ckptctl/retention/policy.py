"""Which checkpoints to keep: the union of every rule given, with the reasons. Pure: no I/O.

The safety rules live here, where hypothesis can prove them (tests/retention/test_policy_properties.py): only
``complete`` units with a step are ever counted or deleted; the newest complete unit, every unit a pointer or a
link names, pinned units and the best M by the metric (ties at the M-th place included) are always kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ckptctl.catalog.model import Status, Unit
from ckptctl.errors import UsageError, literal

PIN_FILE = ".ckptctl-keep"


class PolicyError(UsageError):
    """A policy that cannot be built, in the words of its rules (``PolicyError.naming("{keep_last} must be at
    least 1")``); the command words it with its flags (``for_flags``), a policy file with its keys."""


Action = Literal["keep", "delete", "skip"]


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    keep_every_steps: int | None = None
    keep_within_seconds: float | None = None
    keep_steps: frozenset[int] = frozenset()
    pinned_steps: frozenset[int] = frozenset()
    keep_without_metric: bool = True
    keep_total: int | None = None
    """At most this many in all, the best and the protected ones counted inside (HF ``save_total_limit``,
    Orbax ``max_to_keep``); the rest of the places go to the newest."""

    @classmethod
    def build(
        cls,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        keep_every_steps: int | None = None,
        keep_within_seconds: float | None = None,
        keep_steps: Sequence[int] = (),
        pinned_steps: Sequence[int] = (),
        keep_without_metric: bool = True,
        keep_total: int | None = None,
    ) -> Policy:
        """Validate a policy as the user spelled it; rule 1: no keep rule, no deletion.

        Raises PolicyError, whose message names the rules by ``{rule}`` placeholders: each command words them
        with its own flags (``--keep-last`` for prune, ``--keep-local-last`` for tier push)."""
        if keep_total is not None:
            if keep_total < 1:
                raise PolicyError.naming("{keep_total} must be at least 1")
            clash = [
                rule
                for rule, value in (
                    ("keep_last", keep_last),
                    ("keep_every_steps", keep_every_steps),
                    ("keep_within", keep_within_seconds),
                )
                if value is not None
            ]
            if clash:
                raise PolicyError.naming(
                    "{keep_total} is a total and {" + clash[0] + "} adds to it; use one or the other "
                    "({keep_total} K {keep_best} M keeps the best M and the newest, K in all)"
                )
        if keep_last is not None and keep_last < 1:
            raise PolicyError.naming(
                "{keep_last} must be at least 1 ({keep_last} 0 would delete every checkpoint)"
            )
        if keep_best is not None and keep_best < 1:
            raise PolicyError.naming("{keep_best} must be at least 1")
        if keep_every_steps is not None and keep_every_steps < 1:
            raise PolicyError.naming("{keep_every_steps} must be at least 1")
        mode: Literal["min", "max"] | None = None
        name = metric
        if metric:
            name, _, spelled = metric.partition(":")
            if spelled in ("min", "max"):
                mode = spelled  # type: ignore[assignment]
            elif spelled:
                raise PolicyError.naming(
                    "{metric} " + literal(metric) + ": the mode after ':' must be min or max"
                )
            elif name.endswith("loss"):
                mode = "min"
            else:
                shown = literal(name)
                raise PolicyError.naming(
                    f"{{metric}} {shown}: say whether higher or lower is better ({shown}:max or {shown}:min); "
                    "only names ending in 'loss' default to min"
                )
        if keep_best is not None and not name:
            raise PolicyError.naming("{keep_best} needs {metric} NAME[:min|max]")
        policy = cls(
            keep_last=keep_last,
            keep_best=keep_best,
            metric=name or None,
            mode=mode,
            keep_every_steps=keep_every_steps,
            keep_within_seconds=keep_within_seconds,
            keep_steps=frozenset(keep_steps),
            pinned_steps=frozenset(pinned_steps),
            keep_without_metric=keep_without_metric,
            keep_total=keep_total,
        )
        if not policy.has_rule:
            raise PolicyError.naming(
                "at least one keep rule is needed ({keep_last}, {keep_total}, {keep_best}, {keep_every_steps}, "
                "{keep_within}, {keep_steps}): with no rule nothing is deleted"
            )
        return policy

    @property
    def has_rule(self) -> bool:
        return any(
            (
                self.keep_last,
                self.keep_total,
                self.keep_best,
                self.keep_every_steps,
                self.keep_within_seconds,
                self.keep_steps,
            )
        )


@dataclass(frozen=True)
class Decision:
    unit: Unit
    action: Action
    reasons: tuple[str, ...] = field(default_factory=tuple)


def is_pinned(unit: Unit) -> bool:
    return any(f.path.rsplit("/", 1)[-1] == PIN_FILE for f in unit.files)


def _rank_value(value: float, mode: str) -> float:
    """Sort key where smaller is better; NaN and infinities rank worst whatever the mode."""
    if math.isnan(value) or math.isinf(value):
        return math.inf
    return value if mode == "min" else -value


def decide(
    units: Sequence[Unit], policy: Policy, metrics: Mapping[int, float] | None = None
) -> list[Decision]:
    """Keep, delete or skip each unit, with every reason that applies.

    ``metrics`` maps step -> value from an explicit metric file; otherwise each unit's own ``metrics`` (HF
    trainer_state.json, ``name=value`` in its name) are used. ``skip`` means "not ours to judge" (not complete,
    no step): kept and never counted.
    """
    reasons: dict[str, list[str]] = {u.path: [] for u in units}
    countable = [u for u in units if u.status is Status.COMPLETE and u.is_ranked]
    newest_first = sorted(countable, key=lambda u: (u.step or 0, u.newest_mtime or 0), reverse=True)

    if newest_first:
        reasons[newest_first[0].path].append("newest")
    if policy.keep_last:
        for rank, unit in enumerate(newest_first[: policy.keep_last], start=1):
            reasons[unit.path].append(f"latest#{rank}")
    if policy.keep_best and policy.metric and policy.mode:
        scored: list[tuple[float, Unit, float]] = []
        for unit in newest_first:
            value = metrics.get(unit.step or -1) if metrics is not None else unit.metrics.get(policy.metric)
            if value is None:
                if policy.keep_without_metric:
                    reasons[unit.path].append("no-metric")
                continue
            scored.append((_rank_value(value, policy.mode), unit, value))
        # Every unit tied at the M-th place is kept, so the order among equal values only numbers them: the
        # older first. (Trainers differ: Lightning's top-k refuses an equal newcomer but, when a better one
        # arrives, evicts the older of tied incumbents, keeping the newer; HF keeps a single best.)
        scored.sort(key=lambda item: (item[0], item[1].step or 0))
        if scored:
            cutoff = scored[min(policy.keep_best, len(scored)) - 1][0]
            for rank, (key, unit, value) in enumerate(scored, start=1):
                if rank <= policy.keep_best:
                    reasons[unit.path].append(f"best#{rank} {policy.metric}={value:.4g}")
                elif key == cutoff and not math.isinf(key):
                    reasons[unit.path].append(f"tie@{policy.keep_best} {policy.metric}={value:.4g}")
    if policy.keep_every_steps:
        for unit in countable:
            if (unit.step or 0) % policy.keep_every_steps == 0:
                reasons[unit.path].append(f"every-{policy.keep_every_steps}")
    if policy.keep_within_seconds is not None and newest_first:
        # Relative to the newest checkpoint, not the wall clock (the cron box's clock is not the trainer's).
        anchor = max((u.newest_mtime or 0) for u in countable)
        for unit in countable:
            if unit.newest_mtime is not None and anchor - unit.newest_mtime <= policy.keep_within_seconds:
                reasons[unit.path].append("within")
    for unit in countable:
        if unit.step in policy.keep_steps:
            reasons[unit.path].append("listed")
        if unit.step in policy.pinned_steps or is_pinned(unit):
            reasons[unit.path].append("pinned")
        for pointer in unit.pointers:
            reasons[unit.path].append(f"ref:{pointer}")
    if policy.keep_total:
        # The total form: what the rules above protect counts first, the newest others fill up to K.
        kept = sum(1 for u in countable if reasons[u.path])
        for unit in newest_first:
            if kept >= policy.keep_total:
                break
            if not reasons[unit.path]:
                kept += 1
                reasons[unit.path].append(f"total#{kept}")

    decisions = []
    for unit in units:
        if unit.status is not Status.COMPLETE:
            decisions.append(Decision(unit, "skip", (f"{unit.status.value}: {unit.reason}",)))
        elif not unit.counted:
            refs = tuple(f"ref:{p}" for p in unit.pointers)
            decisions.append(Decision(unit, "skip", ("a copy of the newest state under a fixed name", *refs)))
        elif unit.step is None:
            refs = tuple(f"ref:{p}" for p in unit.pointers)
            decisions.append(Decision(unit, "skip", ("no step in its name", *refs)))
        elif reasons[unit.path]:
            decisions.append(Decision(unit, "keep", tuple(reasons[unit.path])))
        else:
            decisions.append(Decision(unit, "delete", ("not kept by any rule",)))
    return decisions


def decide_incomplete(units: Sequence[Unit], older_than_seconds: float, now: float) -> list[Decision]:
    """``prune --incomplete --older-than D``: the explicit clean-up of half-written saves, never a side effect
    of keep rules. Deletes recognised units that are incomplete or in progress and whose newest file is older
    than D (so a save still being written is never touched); complete, unknown and pointed-to units are kept."""
    decisions = []
    for unit in units:
        age = None if unit.newest_mtime is None else now - unit.newest_mtime
        if unit.status is Status.COMPLETE:
            decisions.append(Decision(unit, "keep", ("complete",)))
        elif unit.layout.value == "unknown" or unit.status is Status.UNKNOWN:
            decisions.append(Decision(unit, "skip", (f"{unit.status.value}: {unit.reason}",)))
        elif unit.pointers:
            decisions.append(Decision(unit, "keep", tuple(f"ref:{p}" for p in unit.pointers)))
        elif unit.journaled:
            decisions.append(Decision(unit, "skip", ("finished by the journal step",)))
        elif age is None or age < older_than_seconds:
            decisions.append(Decision(unit, "skip", (f"{unit.status.value}, but younger than --older-than",)))
        else:
            decisions.append(Decision(unit, "delete", (f"{unit.status.value}: {unit.reason}",)))
    return decisions
