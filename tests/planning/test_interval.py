"""The interval models against their published figures (Daly 2006, Young 1974) and their defining properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptctl.planning import interval

MINUTE = 60.0
HOUR = 3600.0

# Daly (2006), δ = 5 min: the published optimum for each MTBF, at the precision it is published with
# (shared/notes/interval.md §1), and Young's √(2δM) beside it.
DALY_CASES = [(24 * HOUR, 117, 0, 120.0), (6 * HOUR, 57, 0, 60.0), (15 * MINUTE, 9.1, 1, 12.2)]


@pytest.mark.parametrize(("mtbf", "published", "digits", "young"), DALY_CASES)
def test_daly_reproduces_the_published_cases(
    mtbf: float, published: float, digits: int, young: float
) -> None:
    assert round(interval.daly_interval(5 * MINUTE, mtbf) / MINUTE, digits) == published
    assert interval.young_interval(5 * MINUTE, mtbf) / MINUTE == pytest.approx(young, abs=0.05)


@given(
    save_cost=st.floats(min_value=1.0, max_value=3600.0),
    ratio=st.floats(min_value=1e-6, max_value=0.4999),
)
def test_daly_is_young_less_about_two_thirds_of_the_save(save_cost: float, ratio: float) -> None:
    """Expanding Daly's bracket: T = √(2δM) − δ·(⅔ − √(δ/2M)/9), whenever δ < 2M."""
    mtbf = save_cost / ratio / 2
    expected = math.sqrt(2 * save_cost * mtbf) - save_cost * (2 / 3 - math.sqrt(ratio) / 9)
    assert interval.daly_interval(save_cost, mtbf) == pytest.approx(expected, rel=1e-9)
    assert interval.daly_interval(save_cost, mtbf) < interval.young_interval(save_cost, mtbf)


def test_daly_saves_once_per_mtbf_when_a_save_outlasts_two_mtbfs() -> None:
    assert interval.daly_interval(2 * HOUR, HOUR) == HOUR
    assert interval.daly_interval(5 * HOUR, HOUR) == HOUR


@given(
    save_cost=st.floats(min_value=1.0, max_value=600.0),
    mtbf_over_save=st.floats(min_value=100.0, max_value=1e5),
    restart=st.floats(min_value=0.0, max_value=600.0),
    factor=st.sampled_from([0.5, 0.8, 0.95, 1.05, 1.25, 2.0]),
)
def test_young_minimises_the_expected_loss(
    save_cost: float, mtbf_over_save: float, restart: float, factor: float
) -> None:
    mtbf = save_cost * mtbf_over_save
    best = interval.young_interval(save_cost, mtbf)
    assert interval.expected_loss(best, save_cost, mtbf, restart) <= interval.expected_loss(
        best * factor, save_cost, mtbf, restart
    )


def test_expected_loss_counts_saving_rework_and_restarts() -> None:
    # Saving every hour for 10 minutes, failing every 3 hours: 10/60 saving + 30/180 re-done (notes §2).
    assert interval.expected_loss(HOUR, 10 * MINUTE, 3 * HOUR) == pytest.approx(10 / 60 + 30 / 180)
    with_restart = interval.expected_loss(HOUR, 10 * MINUTE, 3 * HOUR, restart_cost=18 * MINUTE)
    assert with_restart == pytest.approx(10 / 60 + 30 / 180 + 0.1)
    assert interval.expected_loss(1.0, HOUR, 2 * HOUR) == 1.0


def test_overhead_floor_spends_exactly_the_budget_on_saving() -> None:
    floor = interval.overhead_floor(40.0, 0.05)
    assert 40.0 / floor == pytest.approx(0.05)
    assert interval.expected_loss(floor, 40.0, 1e15) == pytest.approx(0.05)


def test_gpu_count_scales_llama3s_failure_rate() -> None:
    # Meta's 16,384-GPU job: "one failure every three hours".
    at_llama_scale = interval.mtbf_for_gpus(interval.LLAMA3_GPUS)
    assert at_llama_scale == pytest.approx(
        interval.LLAMA3_DAYS * 24 * HOUR / interval.LLAMA3_UNEXPECTED_INTERRUPTIONS
    )
    assert 3 * HOUR < at_llama_scale < 3.2 * HOUR
    assert interval.mtbf_for_gpus(1024) == pytest.approx(16 * at_llama_scale)


def test_interval_in_steps_rounds_and_never_goes_below_one() -> None:
    assert interval.interval_in_steps(600.0, 5.7) == round(600 / 5.7)
    assert interval.interval_in_steps(1.0, 5.7) == 1


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_non_positive_inputs_are_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        interval.young_interval(60.0, bad)
    with pytest.raises(ValueError):
        interval.daly_interval(bad, HOUR)
    with pytest.raises(ValueError):
        interval.overhead_floor(bad, 0.05)
    with pytest.raises(ValueError):
        interval.overhead_floor(60.0, 1.0)
    with pytest.raises(ValueError):
        interval.mtbf_for_gpus(0)
