"""Runs written by the trainers themselves (tests/fixtures/trainers, made by gen.py with transformers,
lightning, accelerate and torch): list and prune must read them as the trainer means them (issue 14)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckptctl.catalog.scan import scan_run
from ckptctl.storage import Location
from tests.conftest import run_cli
from tests.trainer_fixtures import materialise, run_entry


def units_of(run: Path) -> dict[str, dict]:
    result = run_cli("list", str(run), "--json")
    assert result.returncode == 0, result.stderr
    return {u["path"]: u for u in json.loads(result.stdout)["data"]["units"]}


def planned(result) -> dict[str, dict]:
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return {e["path"]: e for e in events if e.get("event") == "planned"}


def files_below(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# -- Lightning: two fit() calls, two runs --------------------------------------------------------------------


def test_lightning_versions_are_listed_as_two_runs(tmp_path: Path) -> None:
    root = materialise("lightning", tmp_path)
    result = run_cli("list", str(root / "lightning_logs"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    runs = {r["path"]: r for r in data["runs"]}
    assert set(runs) == {"version_0/checkpoints", "version_1/checkpoints"}
    assert runs["version_0/checkpoints"]["newest_step"] == 70
    assert runs["version_1/checkpoints"]["newest_step"] == 40
    assert {u["run"] for u in data["units"]} == set(runs)


def test_prune_refuses_a_folder_of_two_lightning_runs_and_deletes_nothing(tmp_path: Path) -> None:
    """The data-loss case: keep-last 2 over both versions ranked version_1 (the newer run, steps 20..40)
    below version_0's steps 60 and 70 and deleted all of it."""
    root = materialise("lightning", tmp_path)
    before = files_below(root)
    result = run_cli("prune", str(root / "lightning_logs"), "--keep-last", "2")
    assert result.returncode == 4, result.stderr
    assert "holds 2 runs" in result.stderr
    assert "version_0/checkpoints" in result.stderr and "version_1/checkpoints" in result.stderr
    assert files_below(root) == before


def test_prune_of_one_lightning_version_keeps_last_ckpt_and_does_not_count_it(tmp_path: Path) -> None:
    root = materialise("lightning", tmp_path)
    run = root / "lightning_logs" / "version_1" / "checkpoints"
    units = units_of(run)
    last = units["last.ckpt"]
    assert last["pointers"] == ["last"] and last["counted"] is False
    result = run_cli("prune", str(run), "--keep-last", "1", "--json")
    assert result.returncode == 0, result.stderr
    plan = planned(result)
    assert plan["last.ckpt"]["action"] == "skip"
    assert plan["epoch=9-step=40.ckpt"]["action"] == "keep"
    assert sorted(p.name for p in run.iterdir()) == ["epoch=9-step=40.ckpt", "last.ckpt"]


def test_lightning_metrics_csv_is_joined_by_lightnings_rule(tmp_path: Path) -> None:
    """CSVLogger logs the validation of the step-60 checkpoint at step 59; joined exactly, no row matched and
    prune kept everything silently. Joined at step+1, the best by the log is Lightning's own best."""
    root = materialise("lightning", tmp_path)
    fit = run_entry("lightning")["trainer"]["fits"][0]
    version = root / fit["version_dir"]
    result = run_cli(
        "prune",
        str(version / "checkpoints"),
        "--keep-best", "1",
        "--metric", "val_loss",
        "--metric-file", str(version / "metrics.csv"),
        "--dry-run",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = planned(result)
    best = [p for p, e in plan.items() if any(r.startswith("best#1") for r in e["reasons"])]
    assert [f"{version.name}/checkpoints/{b}" for b in best] == [
        Path(fit["best_model_path"]).relative_to("lightning_logs").as_posix()
    ]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["event"] == "summary"


def test_a_metric_file_that_matches_no_checkpoint_is_exit_7(tmp_path: Path) -> None:
    root = materialise("lightning", tmp_path)
    version = root / "lightning_logs" / "version_0"
    foreign = tmp_path / "other.csv"
    foreign.write_text("step,val_loss\n1001,0.5\n1002,0.4\n")
    result = run_cli(
        "prune", str(version / "checkpoints"), "--keep-best", "1", "--metric", "val_loss",
        "--metric-file", str(foreign),
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert "matches no checkpoint" in result.stderr


def test_lightning_names_with_metrics_rank_like_lightnings_top_k(tmp_path: Path) -> None:
    """lightning-named is the same training as version_0 with the metric in the names: Lightning's top 3 is
    version_0's best_k_models; ckptctl keeps them (and, where two tie at the 3rd place, both)."""
    root = materialise("lightning-named", tmp_path)
    run = root / "lightning_logs" / "version_0" / "checkpoints"
    top = run_entry("lightning")["trainer"]["fits"][0]["best_k_models"]
    top_steps = {int(Path(p).stem.split("step=")[1].split("-")[0]) for p in top}
    result = run_cli("prune", str(run), "--keep-best", "3", "--metric", "val_loss", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = planned(result)
    kept = {e["step"] for e in plan.values() if e["action"] == "keep"}
    assert top_steps <= kept
    scores = {round(v, 4) for v in top.values()}
    for entry in plan.values():
        if entry["action"] == "keep" and entry["step"] not in top_steps:
            # Only the newest, or one whose value equals a top-k score (a tie Lightning broke by arrival).
            tied = round(float(entry["path"].rsplit("val_loss=", 1)[1][:-5]), 4) in scores
            assert "newest" in entry["reasons"] or tied, entry


# -- Accelerate -------------------------------------------------------------------------------------------


def test_accelerate_checkpoints_are_units_numbered_by_save(tmp_path: Path) -> None:
    root = materialise("accelerate", tmp_path)
    units = units_of(root)
    assert sorted(units) == [
        "checkpoints/checkpoint_5",
        "checkpoints/checkpoint_6",
        "checkpoints/checkpoint_7",
    ]
    for unit in units.values():
        assert (unit["layout"], unit["status"], unit["step_kind"]) == ("accelerate", "complete", "save")
    kept_by_accelerate = run_entry("accelerate")["trainer"]
    assert json.dumps(kept_by_accelerate)  # recorded by the generator


def test_accelerate_prune_keep_last_matches_total_limit(tmp_path: Path) -> None:
    root = materialise("accelerate", tmp_path)
    result = run_cli("prune", str(root), "--keep-last", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["checkpoint_6", "checkpoint_7"]


def test_accelerate_rules_that_name_steps_are_refused(tmp_path: Path) -> None:
    root = materialise("accelerate", tmp_path)
    result = run_cli("prune", str(root), "--keep-every-steps", "2")
    assert result.returncode == 2, result.stderr
    assert "numbered by save" in result.stderr
    assert len(list((root / "checkpoints").iterdir())) == 3


def test_accelerate_without_its_last_file_is_incomplete(tmp_path: Path) -> None:
    root = materialise("accelerate", tmp_path)
    (root / "checkpoints" / "checkpoint_7" / "random_states_0.pkl").unlink()
    units = units_of(root)
    assert units["checkpoints/checkpoint_7"]["status"] == "incomplete"


def test_prune_on_a_folder_with_nothing_to_rank_is_exit_3(tmp_path: Path) -> None:
    root = materialise("accelerate", tmp_path)
    unit = root / "checkpoints" / "checkpoint_7"
    result = run_cli("prune", str(unit / "model.safetensors").rsplit("/", 1)[0] + "/..", "--keep-last", "1")
    assert result.returncode == 0, result.stderr  # checkpoints/ itself is a run
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((unit / "model.safetensors").read_bytes())
    result = run_cli("prune", str(lone), "--keep-last", "1")
    assert result.returncode == 3, result.stderr
    assert "no checkpoint" in result.stderr and "step" in result.stderr


# -- HF Trainer -------------------------------------------------------------------------------------------


def test_hf_trainer_list_shows_evaluation_metrics_by_default(tmp_path: Path) -> None:
    root = materialise("hf-trainer", tmp_path)
    expected = run_entry("hf-trainer")["trainer"]
    units = units_of(root)
    assert sorted(units) == expected["kept"]
    for path, unit in units.items():
        step = str(unit["step"])
        assert unit["metrics"]["eval_loss"] == pytest.approx(expected["eval_loss"][step])
        assert all(k.startswith("eval") and not k.endswith("_runtime") for k in unit["metrics"]), path
    assert "best" in units[expected["best_model_checkpoint"]]["pointers"]
    everything = json.loads(run_cli("list", str(root), "--json", "--metrics", "all").stdout)["data"]["units"]
    assert any("eval_runtime" in u["metrics"] for u in everything)


def test_hf_save_total_limit_maps_to_keep_total(tmp_path: Path) -> None:
    """save_total_limit=2 with the best at 30 keeps checkpoint-30 and the newest, checkpoint-60."""
    root = materialise("hf-trainer", tmp_path)
    result = run_cli("prune", str(root), "--keep-total", "2", "--keep-best", "1", "--metric", "eval_loss")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["checkpoint-30", "checkpoint-60"]


def test_scan_of_the_hf_run_reads_only_the_newest_markers(tmp_path: Path) -> None:
    root = materialise("hf-trainer", tmp_path)
    scan = scan_run(Location.from_url(str(root)))
    assert all(u.status.value == "complete" for u in scan.units)


def test_lightning_default_names_rank_by_the_score_each_file_records(tmp_path: Path) -> None:
    """{epoch}-{step}.ckpt names carry no metric; each file's ModelCheckpoint state has its current_score."""
    root = materialise("lightning", tmp_path)
    fit = run_entry("lightning")["trainer"]["fits"][0]
    run = root / fit["version_dir"] / "checkpoints"
    units = units_of(run)
    for path, score in fit["best_k_models"].items():
        unit = units[Path(path).name]
        assert unit["metrics"] == {"val_loss": pytest.approx(score)}
        assert unit["metric_source"] == "ckpt"
    assert units["last.ckpt"]["step"] == fit["global_step"] and units["last.ckpt"]["metrics"] == {}
    result = run_cli("prune", str(run), "--keep-best", "1", "--metric", "val_loss", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    best = [p for p, e in planned(result).items() if any(r.startswith("best#1") for r in e["reasons"])]
    assert best == [Path(fit["best_model_path"]).name]


def test_lightning_state_is_read_from_an_object_store_too(backend, tmp_path: Path) -> None:
    root = materialise("lightning", tmp_path)
    fit = run_entry("lightning")["trainer"]["fits"][1]
    backend.put_tree(root / fit["version_dir"] / "checkpoints", "ckpts")
    scan = scan_run(backend.location("ckpts"), settle_seconds=0)
    units = {u.path: u for u in scan.units}
    assert units["last.ckpt"].step == fit["global_step"] and "last" in units["last.ckpt"].pointers
    for path, score in fit["best_k_models"].items():
        assert units[Path(path).name].status.value == "complete"
        assert units[Path(path).name].metrics["val_loss"] == pytest.approx(score)


# -- torch.save: legacy and zip ---------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["torch-legacy", "torch-zip"])
def test_torch_save_files_are_complete_and_survive_incomplete_cleanup(tmp_path: Path, run: str) -> None:
    """The data-loss case: legacy-format files were all "incomplete", so --incomplete deleted every one."""
    root = materialise(run, tmp_path)
    before = files_below(root)
    units = units_of(root)
    assert {u["status"] for u in units.values()} == {"complete"}, units
    assert sorted(u["step"] for u in units.values() if u["step"] is not None) == [10, 20, 30, 40, 50]
    result = run_cli("prune", str(root), "--incomplete", "--older-than", "1s")
    assert result.returncode == 0, result.stderr
    assert files_below(root) == before


def test_a_cut_legacy_file_is_incomplete(tmp_path: Path) -> None:
    root = materialise("torch-legacy", tmp_path)
    victim = root / "step_30.pt"
    data = victim.read_bytes()
    stamp = victim.stat().st_mtime
    victim.write_bytes(data[: len(data) - 100])
    os.utime(victim, (stamp, stamp))
    unit = units_of(root)["step_30.pt"]
    assert unit["status"] == "incomplete", unit
