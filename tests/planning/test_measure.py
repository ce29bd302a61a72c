"""What advise measures from a run's file sizes and times, on runs whose times the test sets."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from ckptctl.catalog.scan import scan_run
from ckptctl.errors import ExitCode, NotFoundError, UsageError
from ckptctl.planning.advice import AdviceOptions, advise, advise_run
from ckptctl.planning.interval import daly_interval
from ckptctl.planning.measure import TooShortToMeasureError, measure_saves
from ckptctl.storage import Location
from tests.catalog.runs import age_tree, safetensors_file
from tests.conftest import Backend
from tests.planning.timed_runs import SaveSpec, put_timed_run, steady_run, unit_bytes, write_timed_run

EVERY, INTERVAL, WRITE = 100, 600.0, 30.0
# The stores whose file times a test can set (the shared ``backend`` fixture, narrowed).
TIMED_BACKENDS = pytest.mark.parametrize("backend", ["local", "memory"], indirect=True)


def _measure(url: str, options: dict[str, str] | None = None):
    return measure_saves(scan_run(Location.from_url(url, options or {})))


@TIMED_BACKENDS
def test_reports_exactly_the_size_write_time_interval_and_crash_the_run_shows(
    backend: Backend, tmp_path: Path
) -> None:
    saves = steady_run(5, every=EVERY, interval=INTERVAL, write=WRITE, incomplete=4)
    url = put_timed_run(backend, tmp_path, saves)
    m = _measure(url, backend.options)
    size = unit_bytes(saves[0])
    assert [s.step for s in m.complete] == [100, 200, 300, 500]
    assert m.size.value == size and m.size_trend.value == 0
    assert m.write_time is not None and m.write_time.value == pytest.approx(WRITE)
    assert m.bandwidth is not None and m.bandwidth.value == pytest.approx(size / WRITE)
    assert m.bandwidth_trend is not None and m.bandwidth_trend.value == pytest.approx(0)
    assert m.step_time.value == pytest.approx((INTERVAL - WRITE) / EVERY)
    assert (m.interval_steps.value, m.interval_seconds.value) == (EVERY, pytest.approx(INTERVAL))
    assert [(e.kind, e.path, e.step) for e in m.evidence] == [("incomplete", "checkpoint-400", 400)]
    assert {i.label for i in m.inputs()} == {"measured"}


def test_a_stretch_far_slower_than_usual_is_a_sign_of_failure(tmp_path: Path) -> None:
    saves = steady_run(4, every=EVERY, interval=INTERVAL, write=WRITE)
    saves.append(SaveSpec(500, saves[-1].marker_at + 5 * INTERVAL, WRITE))
    write_timed_run(tmp_path / "run", saves)
    m = _measure(str(tmp_path / "run"))
    assert [(e.kind, e.step) for e in m.evidence] == [("gap", 500)]
    # The slow stretch says nothing about the step rate or the interval the trainer is set to.
    assert m.step_time.value == pytest.approx((INTERVAL - WRITE) / EVERY)
    assert m.interval_seconds.value == pytest.approx(INTERVAL)


def test_the_time_a_gap_lost_is_the_inferred_restart_cost(tmp_path: Path) -> None:
    """A stretch five intervals long trained one interval's steps: the rest (4 intervals, less nothing else)
    is what the stop cost, an upper bound of the restart cost; a given --restart-cost wins over it."""
    saves = steady_run(4, every=EVERY, interval=INTERVAL, write=WRITE)
    saves.append(SaveSpec(500, saves[-1].marker_at + 5 * INTERVAL, WRITE))
    write_timed_run(tmp_path / "run", saves)
    m = _measure(str(tmp_path / "run"))
    lost = 5 * INTERVAL - EVERY * (INTERVAL - WRITE) / EVERY - WRITE
    assert m.recovery is not None and m.recovery.value == pytest.approx(lost) == 4 * INTERVAL
    inferred = advise(m, AdviceOptions(mtbf=86_400.0), url="run").inputs["restart_cost"]
    assert (inferred.label, inferred.value) == ("inferred", pytest.approx(lost))
    assert "upper bound" in inferred.basis
    given = advise(m, AdviceOptions(mtbf=86_400.0, restart_cost=60.0), url="run").inputs["restart_cost"]
    assert (given.label, given.value) == ("given", 60.0)
    steady = _measure_steady(tmp_path)
    assert steady.recovery is None


def _measure_steady(tmp_path: Path):
    saves = steady_run(4, every=EVERY, interval=INTERVAL, write=WRITE)
    write_timed_run(tmp_path / "steady", saves)
    return _measure(str(tmp_path / "steady"))


def test_a_step_written_after_a_higher_one_is_a_restart_from_an_older_checkpoint(tmp_path: Path) -> None:
    saves = steady_run(3, every=EVERY, interval=INTERVAL, write=WRITE)
    saves.append(SaveSpec(150, saves[-1].marker_at + INTERVAL, WRITE))  # resumed from step 100
    write_timed_run(tmp_path / "run", saves)
    m = _measure(str(tmp_path / "run"))
    assert [(e.kind, e.step) for e in m.evidence if e.kind == "step-regression"] == [("step-regression", 150)]


def test_single_file_checkpoints_have_no_measurable_write_time(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (100, 200, 300):
        safetensors_file(run / f"model_step_{step}.safetensors")
    age_tree(run, 86_400)
    now = time.time()
    for i, step in enumerate((100, 200, 300)):
        stamp = now - 86_400 + i * INTERVAL
        os.utime(run / f"model_step_{step}.safetensors", (stamp, stamp))
    m = _measure(str(run))
    assert m.write_time is None and m.bandwidth is None
    assert m.step_time.value == pytest.approx(INTERVAL / EVERY)
    advice = advise(m, AdviceOptions(mtbf=3600.0), url=str(run))
    assert advice.daly is None and any("--save-cost" in need for need in advice.needs)
    given = advise(m, AdviceOptions(mtbf=3600.0, save_cost=20.0), url=str(run))
    assert given.daly is not None and given.daly.seconds == pytest.approx(daly_interval(20.0, 3600.0))
    assert given.inputs["save_cost"].label == "given"


@TIMED_BACKENDS
def test_one_complete_checkpoint_is_too_short_to_measure(backend: Backend, tmp_path: Path) -> None:
    url = put_timed_run(backend, tmp_path, steady_run(2, incomplete=2))
    with pytest.raises(
        TooShortToMeasureError, match="at least two complete checkpoints with steps"
    ) as caught:
        _measure(url, backend.options)
    assert caught.value.exit_code == ExitCode.NOT_FOUND and isinstance(caught.value, NotFoundError)


def test_checkpoints_sharing_one_time_are_too_short_to_measure(tmp_path: Path) -> None:
    saves = [SaveSpec(step, 0.0, WRITE) for step in (100, 200, 300)]
    write_timed_run(tmp_path / "run", saves)
    with pytest.raises(TooShortToMeasureError, match="at least two complete checkpoints"):
        _measure(str(tmp_path / "run"))


def test_several_runs_in_one_folder_are_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_timed_run(tmp_path / "root" / name, steady_run(2))
    with pytest.raises(UsageError, match="several runs"):
        _measure(str(tmp_path / "root"))


def test_a_missing_run_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        advise_run(str(tmp_path / "missing"), AdviceOptions())


@TIMED_BACKENDS
def test_advice_rests_on_the_measured_save_and_the_given_failure_rate(
    backend: Backend, tmp_path: Path
) -> None:
    saves = steady_run(5, every=EVERY, interval=INTERVAL, write=WRITE)
    url = put_timed_run(backend, tmp_path, saves)
    mtbf = 24 * 3600.0
    advice = advise_run(url, AdviceOptions(mtbf=mtbf, keep_last=3), storage_options=[])
    step_time = (INTERVAL - WRITE) / EVERY
    assert advice.daly is not None and advice.young is not None and advice.suggested is not None
    assert advice.daly.seconds == pytest.approx(daly_interval(WRITE, mtbf))
    assert advice.daly.steps == round(daly_interval(WRITE, mtbf) / step_time)
    assert advice.suggested is advice.daly  # 30 s saves: the failure optimum is far above the 5 % floor
    assert advice.current.steps == EVERY and advice.current.loss is not None
    assert advice.suggested.loss is not None and advice.suggested.loss < advice.current.loss
    assert advice.storage["keep_last"]["bytes"] == 3 * unit_bytes(saves[0])
    assert {advice.inputs[k].label for k in ("mtbf", "restart_cost", "size")} == {
        "given",
        "assumed",
        "measured",
    }
    assert advice.needs == ()


def test_without_a_given_failure_rate_the_runs_own_failures_set_it(tmp_path: Path) -> None:
    saves = steady_run(5, every=EVERY, interval=INTERVAL, write=WRITE, incomplete=4)
    write_timed_run(tmp_path / "run", saves)
    m = _measure(str(tmp_path / "run"))
    advice = advise(m, AdviceOptions(), url=str(tmp_path / "run"))
    mtbf = advice.inputs["mtbf"]
    assert mtbf.label == "inferred"
    assert mtbf.value == pytest.approx((saves[-1].marker_at - saves[0].marker_at) / len(m.evidence))
    assert advice.daly is not None and advice.daly.seconds == pytest.approx(daly_interval(WRITE, mtbf.value))


def test_capacity_counts_the_checkpoints_that_fit(tmp_path: Path) -> None:
    saves = steady_run(3, every=EVERY, interval=INTERVAL, write=WRITE)
    write_timed_run(tmp_path / "run", saves)
    advice = advise_run(str(tmp_path / "run"), AdviceOptions.parse(capacity="1MB", mtbf="1d"))
    assert advice.inputs["capacity"].label == "given"
    assert advice.storage["checkpoints_that_fit"] == 10**6 // unit_bytes(saves[0])
    measured = advise_run(str(tmp_path / "run"), AdviceOptions.parse(mtbf="1d")).inputs["capacity"]
    assert measured.label == "measured"
    assert 0 < (measured.value or 0) <= shutil.disk_usage(tmp_path).total


def test_a_save_slowing_down_and_a_loss_no_interval_fixes_are_noted(tmp_path: Path) -> None:
    saves = [SaveSpec(100 * i, 3600.0 * i, 30.0 * i) for i in (1, 2, 3)]  # same size, ever slower writes
    write_timed_run(tmp_path / "run", saves)
    m = _measure(str(tmp_path / "run"))
    assert m.bandwidth_trend is not None and m.bandwidth_trend.value == pytest.approx(1 / 3 - 1)
    calm = advise(m, AdviceOptions(mtbf=30 * 86_400.0), url="run")
    assert [n for n in calm.notes if "bandwidth fell by 67%" in n] and not [
        n for n in calm.notes if "even" in n
    ]
    stormy = advise(m, AdviceOptions(mtbf=600.0), url="run")
    assert stormy.suggested is not None and stormy.suggested.loss is not None
    assert any(
        n.startswith(f"even the best interval loses {stormy.suggested.loss:.0%}") for n in stormy.notes
    )
