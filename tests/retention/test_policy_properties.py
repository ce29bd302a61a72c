"""Hypothesis proves the safety rules of the policy on random runs (steps, statuses, metrics with NaN and ties,
pointers, pins): what rule 2 and 3 protect is never deleted, and at least min(K, complete) units are kept."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptctl.catalog.model import Status
from ckptctl.retention.policy import Policy, decide
from tests.retention.test_policy import unit

statuses = st.sampled_from([Status.COMPLETE] * 4 + [Status.INCOMPLETE, Status.IN_PROGRESS, Status.UNKNOWN])
losses = st.one_of(
    st.none(), st.sampled_from([0.5, 1.0, 1.5]), st.floats(allow_nan=True, allow_infinity=True)
)
unit_specs = st.lists(
    st.tuples(st.integers(1, 10_000), statuses, losses, st.booleans(), st.booleans()),
    min_size=0,
    max_size=25,
    unique_by=lambda spec: spec[0],
)


@settings(max_examples=400, deadline=None)
@given(unit_specs, st.integers(1, 5), st.one_of(st.none(), st.integers(1, 4)))
def test_plan_never_deletes_what_the_rules_protect(specs, keep_last: int, keep_best: int | None) -> None:
    units = [
        unit(step, status, loss=loss, pointers=("latest",) if ref else (), pinned=pin)
        for step, status, loss, ref, pin in specs
    ]
    policy = Policy.build(keep_last=keep_last, keep_best=keep_best, metric="eval_loss" if keep_best else None)
    decisions = decide(units, policy)
    deleted = {d.unit.path for d in decisions if d.action == "delete"}
    complete = sorted((u for u in units if u.status is Status.COMPLETE), key=lambda u: u.step or 0)
    for u in units:
        if (
            u.status is not Status.COMPLETE
            or u.pointers
            or any(f.path.endswith(".ckptctl-keep") for f in u.files)
        ):
            assert u.path not in deleted
    if complete:
        assert complete[-1].path not in deleted  # the newest complete unit
        assert len([u for u in complete if u.path not in deleted]) >= min(keep_last, len(complete))
        for u in complete[-keep_last:]:
            assert u.path not in deleted
    if keep_best:
        scored = sorted(
            (math.inf if (v := u.metrics.get("eval_loss")) is None or not math.isfinite(v) else v, u.path)
            for u in complete
            if u.metrics.get("eval_loss") is not None
        )
        finite = [s for s in scored if s[0] != math.inf]
        for value, path in finite[:keep_best]:
            assert path not in deleted, (value, path)
        for u in complete:
            if "eval_loss" not in u.metrics:
                assert u.path not in deleted  # no-metric units are kept by default
