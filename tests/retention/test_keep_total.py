"""``--keep-total K``: HF ``save_total_limit`` / Orbax ``max_to_keep`` semantics — a total with the best and
the protected checkpoints counted inside (issue 14 item 11)."""

from __future__ import annotations

import pytest

from ckptctl.catalog.model import Layout, Status, Unit, UnitFile
from ckptctl.errors import UsageError
from ckptctl.retention.policy import Policy, decide


def unit(step: int, loss: float | None = None, pointers: tuple[str, ...] = ()) -> Unit:
    return Unit(
        path=f"checkpoint-{step}",
        kind="dir",
        layout=Layout.HF_TRAINER,
        step=step,
        epoch=None,
        status=Status.COMPLETE,
        reason="trainer_state.json present",
        files=(UnitFile(f"checkpoint-{step}/model.safetensors", 10, float(step)),),
        total_bytes=10,
        newest_mtime=float(step),
        pointers=pointers,
        metrics={} if loss is None else {"eval_loss": loss},
    )


def kept(decisions: list) -> list[int]:
    return sorted(d.unit.step for d in decisions if d.action == "keep")


def test_total_with_the_best_inside_matches_hf_save_total_limit() -> None:
    """notes §7.1: K=2 over saves 10..80 with the best at 40 kept checkpoint-40 and -80."""
    losses = {10: 5.0, 20: 4.0, 30: 3.5, 40: 3.0, 50: 3.2, 60: 3.4, 70: 3.6, 80: 3.8}
    units = [unit(s, v) for s, v in losses.items()]
    policy = Policy.build(keep_total=2, keep_best=1, metric="eval_loss")
    assert kept(decide(units, policy)) == [40, 80]


def test_total_when_the_best_is_the_newest_keeps_the_two_newest() -> None:
    losses = {10: 5.0, 20: 4.0, 30: 3.5, 40: 3.0, 50: 2.9, 60: 2.8, 70: 2.7, 80: 2.6}
    units = [unit(s, v) for s, v in losses.items()]
    assert kept(decide(units, Policy.build(keep_total=2, keep_best=1, metric="eval_loss"))) == [70, 80]


def test_union_form_can_keep_more_than_the_total_form() -> None:
    losses = {10: 5.0, 20: 4.0, 30: 3.0, 40: 3.5}
    units = [unit(s, v) for s, v in losses.items()]
    union = decide(units, Policy.build(keep_last=2, keep_best=1, metric="eval_loss"))
    total = decide(units, Policy.build(keep_total=2, keep_best=1, metric="eval_loss"))
    assert kept(union) == [30, 40]
    assert kept(total) == [30, 40]
    losses[20] = 1.0
    units = [unit(s, v) for s, v in losses.items()]
    assert kept(decide(units, Policy.build(keep_last=2, keep_best=1, metric="eval_loss"))) == [20, 30, 40]
    assert kept(decide(units, Policy.build(keep_total=2, keep_best=1, metric="eval_loss"))) == [20, 40]


def test_protected_checkpoints_are_kept_even_beyond_the_total() -> None:
    units = [unit(10, pointers=("best",)), unit(20, pointers=("latest",)), unit(30), unit(40)]
    assert kept(decide(units, Policy.build(keep_total=1))) == [10, 20, 40]


@pytest.mark.parametrize(
    "extra", [{"keep_last": 2}, {"keep_every_steps": 10}, {"keep_within_seconds": 60.0}], ids=str
)
def test_total_and_union_rules_do_not_mix(extra: dict) -> None:
    with pytest.raises(UsageError, match="keep-total is a total"):
        Policy.build(keep_total=3, **extra)


def test_total_must_be_positive() -> None:
    with pytest.raises(UsageError, match="at least 1"):
        Policy.build(keep_total=0)
