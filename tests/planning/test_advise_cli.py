"""``ckptctl advise`` as users run it: a real subprocess without a TTY, on runs whose file times the test sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptctl.planning.interval import (
    GPU_SECONDS_PER_FAILURE,
    daly_interval,
    expected_loss,
    overhead_floor,
    young_interval,
)
from tests.conftest import run_cli
from tests.planning.timed_runs import steady_run, unit_bytes, write_timed_run

EVERY, INTERVAL, WRITE = 100, 600.0, 30.0
STEP_TIME = (INTERVAL - WRITE) / EVERY


@pytest.fixture
def run(tmp_path: Path) -> Path:
    write_timed_run(
        tmp_path / "run", steady_run(5, every=EVERY, interval=INTERVAL, write=WRITE, incomplete=4)
    )
    return tmp_path / "run"


def _advise_json(*args: str) -> dict:
    result = run_cli("advise", *args, "--json")
    assert result.returncode == 0, result.stderr
    payload: dict = json.loads(result.stdout)
    return payload["data"]


def test_human_output_labels_each_input_and_suggests_an_interval(run: Path) -> None:
    result = run_cli("advise", str(run), "--mtbf", "24h", "--keep-last", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows: dict[str, list[str]] = {}
    for line in filter(str.strip, lines):
        rows.setdefault(line.split()[0], line.split())  # the first line that starts with the word
    assert rows["size"][3] == "measured"  # size, "12", "KiB", label
    assert "given" in rows["mtbf"] and "assumed" in rows["restart_cost"] and "measured" in rows["save_cost"]
    daly = daly_interval(WRITE, 24 * 3600)
    assert rows["daly"][1:3] == [f"{daly / 60:.1f}", str(round(daly / STEP_TIME))]
    assert rows["young"][1] == f"{young_interval(WRITE, 24 * 3600) / 60:.1f}"
    assert rows["current"][2] == str(EVERY)
    assert f"suggested: save every {round(daly / STEP_TIME)} steps" in result.stdout
    assert "incomplete" in rows and "checkpoint-400" in " ".join(rows["incomplete"])
    assert "keep-last 3 holds" in result.stdout
    timeline = [
        line.split() for line in lines[next(i for i, t in enumerate(lines) if t.startswith("timeline")) :]
    ]
    assert [row[0] for row in timeline[1:]] == ["200", "300", "400", "500"]
    assert all(row[1].startswith("-") and row[1].endswith("#") for row in timeline[1:])
    assert "\x1b[" not in result.stdout + result.stderr


def test_json_gives_every_input_with_its_label_and_every_result(run: Path) -> None:
    data = _advise_json(str(run), "--mtbf", "6h", "--restart-cost", "10m", "--keep-last", "2")
    inputs = data["inputs"]
    assert inputs["size"] == {
        "value": unit_bytes(steady_run(1)[0]),
        "unit": "B",
        "label": "measured",
        "basis": inputs["size"]["basis"],
    }
    assert inputs["save_cost"]["value"] == pytest.approx(WRITE) and inputs["save_cost"]["label"] == "measured"
    assert inputs["step_time"]["value"] == pytest.approx(STEP_TIME)
    assert (inputs["mtbf"]["value"], inputs["mtbf"]["label"]) == (6 * 3600, "given")
    assert (inputs["restart_cost"]["value"], inputs["restart_cost"]["label"]) == (600, "given")
    assert inputs["max_overhead"] == {**inputs["max_overhead"], "value": 0.05, "label": "assumed"}
    assert [e["kind"] for e in data["evidence"]] == ["incomplete"]
    intervals = data["intervals"]
    daly = daly_interval(WRITE, 6 * 3600)
    assert intervals["daly"]["seconds"] == pytest.approx(daly)
    assert intervals["daly"]["expected_loss"] == pytest.approx(expected_loss(daly, WRITE, 6 * 3600, 600))
    current = EVERY * STEP_TIME
    assert intervals["current"]["expected_loss"] == pytest.approx(
        expected_loss(current, WRITE, 6 * 3600, 600)
    )
    assert intervals["overhead_floor"]["seconds"] == pytest.approx(overhead_floor(WRITE, 0.05))
    assert intervals["suggested"] == intervals["daly"]
    assert data["storage"]["keep_last"]["bytes"] == 2 * inputs["size"]["value"]
    assert [s["step"] for s in data["saves"]] == [100, 200, 300, 400, 500]


@pytest.mark.parametrize(("mtbf", "published", "digits"), [("24h", 117, 0), ("6h", 57, 0), ("15m", 9.1, 1)])
def test_dalys_published_cases_through_the_command(
    run: Path, mtbf: str, published: float, digits: int
) -> None:
    data = _advise_json(str(run), "--save-cost", "5m", "--mtbf", mtbf)
    assert round(data["intervals"]["daly"]["seconds"] / 60, digits) == published
    assert data["inputs"]["save_cost"] == {**data["inputs"]["save_cost"], "value": 300, "label": "given"}


def test_a_budget_above_the_failure_optimum_sets_the_suggestion(run: Path) -> None:
    data = _advise_json(str(run), "--mtbf", "2h", "--max-overhead", "1%")
    floor = overhead_floor(WRITE, 0.01)
    assert floor > daly_interval(WRITE, 7200)
    assert data["intervals"]["suggested"]["seconds"] == pytest.approx(floor)
    assert data["inputs"]["max_overhead"]["label"] == "given"


def test_gpus_derive_the_mtbf_from_llama3s_failure_rate(run: Path) -> None:
    mtbf = _advise_json(str(run), "--gpus", "2048")["inputs"]["mtbf"]
    assert mtbf["value"] == pytest.approx(GPU_SECONDS_PER_FAILURE / 2048)
    assert mtbf["label"] == "assumed" and "Llama 3" in mtbf["basis"]


def test_without_a_failure_rate_it_says_what_it_needs(tmp_path: Path) -> None:
    write_timed_run(tmp_path / "run", steady_run(4, every=EVERY, interval=INTERVAL, write=WRITE))
    result = run_cli("advise", str(tmp_path / "run"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    assert data["intervals"]["daly"] is None and data["intervals"]["overhead_floor"] is not None
    assert any("--mtbf" in need for need in data["needs"])
    human = run_cli("advise", str(tmp_path / "run"))
    assert human.returncode == 0 and "--mtbf DURATION or --gpus N" in human.stderr


def test_a_run_too_short_to_measure_exits_3_and_says_what_it_needs(tmp_path: Path) -> None:
    write_timed_run(tmp_path / "run", steady_run(2, incomplete=2))
    result = run_cli("advise", str(tmp_path / "run"), "--mtbf", "6h")
    assert result.returncode == 3
    assert "at least two complete checkpoints with steps" in result.stderr
    payload = json.loads(run_cli("advise", str(tmp_path / "run"), "--json").stdout)
    assert payload["exit_code"] == 3 and payload["errors"][0]["code"] == "too_short_to_measure"


def test_a_missing_run_exits_3(tmp_path: Path) -> None:
    result = run_cli("advise", str(tmp_path / "missing"), "--mtbf", "6h")
    assert result.returncode == 3 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--mtbf", "0"],
        ["--mtbf", "-1h"],
        ["--mtbf", "0s"],
        ["--gpus", "0"],
        ["--save-cost", "0"],
        ["--max-overhead", "150%"],
        ["--max-overhead", "0"],
        ["--mtbf", "1h", "--gpus", "8"],
    ],
)
def test_bad_flags_are_usage_errors(run: Path, flags: list[str]) -> None:
    result = run_cli("advise", str(run), *flags)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
