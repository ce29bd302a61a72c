"""The keep rules and their reasons, on hand-made units (the policy is pure: no I/O)."""

from __future__ import annotations

import math

import pytest

from ckptctl.catalog.model import Layout, Status, Unit, UnitFile
from ckptctl.errors import UsageError
from ckptctl.retention.policy import Policy, decide


def unit(
    step: int | None,
    status: Status = Status.COMPLETE,
    *,
    loss: float | None = None,
    pointers: tuple[str, ...] = (),
    pinned: bool = False,
    mtime: float | None = None,
) -> Unit:
    name = f"checkpoint-{step}"
    files = [UnitFile(f"{name}/model.safetensors", 10, mtime)]
    if pinned:
        files.append(UnitFile(f"{name}/.ckptctl-keep", 0, mtime))
    return Unit(
        path=name,
        kind="dir",
        layout=Layout.HF_TRAINER,
        step=step,
        epoch=None,
        status=status,
        reason="r",
        files=tuple(files),
        total_bytes=10,
        newest_mtime=mtime if mtime is not None else float(step or 0),
        pointers=pointers,
        metrics={} if loss is None else {"eval_loss": loss},
    )


def actions(decisions) -> dict[int | None, str]:
    return {d.unit.step: d.action for d in decisions}


def test_keep_last_counts_complete_units_only() -> None:
    units = [unit(100), unit(200), unit(300), unit(400, Status.INCOMPLETE), unit(500, Status.IN_PROGRESS)]
    got = actions(decide(units, Policy.build(keep_last=2)))
    assert got == {100: "delete", 200: "keep", 300: "keep", 400: "skip", 500: "skip"}


def test_keep_best_with_ties_nan_and_missing_values() -> None:
    units = [
        unit(100, loss=1.0),
        unit(200, loss=0.5),
        unit(300, loss=0.5),
        unit(400, loss=math.nan),
        unit(500),
        unit(600, loss=2.0),
    ]
    decisions = decide(units, Policy.build(keep_best=1, metric="eval_loss"))
    reasons = {d.unit.step: d.reasons for d in decisions}
    assert actions(decisions) == {
        100: "delete",
        200: "keep",
        300: "keep",
        400: "delete",
        500: "keep",
        600: "keep",
    }
    assert any(r.startswith("best#1") for r in reasons[200]) and any(
        r.startswith("tie@1") for r in reasons[300]
    )
    assert reasons[500] == ("no-metric",) and reasons[600] == ("newest",)
    no_missing = decide(units, Policy.build(keep_best=1, metric="eval_loss", keep_without_metric=False))
    assert actions(no_missing)[500] == "delete"


def test_pointers_pins_steps_every_and_within() -> None:
    units = [
        unit(100, pointers=("latest",)),
        unit(200, pinned=True),
        unit(300),
        unit(1000),
        unit(1100),
        unit(1200, mtime=5000.0),
        unit(1300, mtime=5000.0 + 3600),
    ]
    policy = Policy.build(keep_every_steps=1000, keep_steps=[300], keep_within_seconds=3600)
    got = {d.unit.step: (d.action, d.reasons) for d in decide(units, policy)}
    assert got[100] == ("keep", ("ref:latest",))
    assert got[200] == ("keep", ("pinned",))
    assert got[300] == ("keep", ("listed",))
    assert got[1000] == ("keep", ("every-1000",))
    assert got[1100][0] == "delete"
    assert got[1200] == ("keep", ("within",))
    assert got[1300] == ("keep", ("newest", "within"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "at least one keep rule"),
        ({"keep_last": 0}, "keep-last must be at least 1"),
        ({"keep_best": 2}, "keep-best needs metric"),
        ({"keep_best": 2, "metric": "accuracy"}, "say whether higher or lower is better"),
        ({"keep_best": 2, "metric": "acc:up"}, "must be min or max"),
    ],
)
def test_policies_that_are_usage_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Policy.build(**kwargs)  # type: ignore[arg-type]


def test_metric_mode_inference() -> None:
    assert Policy.build(keep_best=1, metric="eval_loss").mode == "min"
    assert Policy.build(keep_best=1, metric="eval_acc:max").mode == "max"
