"""advise on every store: local disk, memory://, S3 (moto) and GCS (emulator), with files uploaded in real time
(object stores set their own file times, so the saves are spaced by waiting)."""

from __future__ import annotations

import time

import pytest

from ckptctl.planning.advice import AdviceOptions, advise_run
from ckptctl.planning.interval import daly_interval
from tests.conftest import Backend
from tests.planning.timed_runs import SaveSpec, unit_bytes, unit_files

PAUSE = 1.1  # above the one-second resolution of some stores' modification times


def test_measures_sizes_interval_and_a_cut_save_on_every_store(backend: Backend) -> None:
    saves = [SaveSpec(100, 0, 0), SaveSpec(200, 0, 0), SaveSpec(300, 0, 0, complete=False)]
    location = backend.location("run")
    for i, save in enumerate(saves):
        if i:
            time.sleep(PAUSE)
        for name, data in unit_files(save).items():
            if backend.name == "local":
                location.fs.makedirs(location.full_path(f"checkpoint-{save.step}"), exist_ok=True)
            location.fs.pipe_file(location.full_path(f"checkpoint-{save.step}/{name}"), data)
    options = AdviceOptions(mtbf=6 * 3600.0, save_cost=300.0, settle_seconds=0)
    advice = advise_run(
        f"{backend.url}/run", options, storage_options=[f"{k}={v}" for k, v in backend.options.items()]
    )
    m = advice.measurement
    assert m.size.value == unit_bytes(saves[0])
    assert [s.step for s in m.complete] == [100, 200]
    assert m.interval_steps.value == 100
    assert m.interval_seconds.value >= 1.0
    assert [(e.kind, e.path) for e in m.evidence] == [("incomplete", "checkpoint-300")]
    assert advice.daly is not None and advice.daly.seconds == pytest.approx(daly_interval(300.0, 6 * 3600.0))
    capacity = advice.inputs["capacity"]
    if backend.name == "local":
        assert capacity.label == "measured" and (capacity.value or 0) > 0
    else:  # no object store reports free space: said, not guessed
        assert (capacity.label, capacity.value) == ("assumed", None) and "--capacity" in capacity.basis
        assert advice.storage["checkpoints_that_fit"] is None
