"""The readers on the files real trainers wrote (tests/fixtures/trainers: transformers Trainer, Lightning,
Accelerate, torch.save zip and legacy), checked against what the trainers themselves recorded in the manifest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ckptctl.errors import UnsafePickleError
from ckptctl.formats.lightning import read_lightning_meta
from ckptctl.formats.quick_check import quick_check_file
from ckptctl.formats.source import FileSource
from ckptctl.inspect import inspect_checkpoint
from ckptctl.storage.location import Location
from tests.trainer_fixtures import TRAINER_FIXTURES, run_entry

CHECKPOINT_FILES = sorted(
    p
    for p in TRAINER_FIXTURES.rglob("*")
    if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt", ".safetensors") and "_" not in p.parts[-2][:1]
)


def _rel(path: Path) -> str:
    return path.relative_to(TRAINER_FIXTURES).as_posix()


def _source(path: Path) -> FileSource:
    return FileSource(Location.from_url(str(path.parent)), path.name, path.stat().st_size)


def test_there_are_files_of_every_trainer() -> None:
    runs = {_rel(p).split("/")[0] for p in CHECKPOINT_FILES}
    assert runs == {"accelerate", "hf-trainer", "lightning", "lightning-named", "torch-legacy", "torch-zip"}


@pytest.mark.parametrize("path", CHECKPOINT_FILES, ids=_rel)
def test_every_file_is_whole_to_list_and_to_inspect(path: Path) -> None:
    check = quick_check_file(Location.from_url(str(path.parent)), path.name, path.stat().st_size)
    assert check.ok is True, check.reason
    if path.name == "training_args.bin":  # a TrainingArguments object: checked, never shown
        with pytest.raises(UnsafePickleError, match=r"transformers\.training_args\.TrainingArguments"):
            inspect_checkpoint(str(path))
        return
    result = inspect_checkpoint(str(path), verify=True)
    assert result.complete and result.verified


@pytest.mark.parametrize(
    "unit",
    ["hf-trainer/checkpoint-30", "hf-trainer/checkpoint-60", "accelerate/checkpoints/checkpoint_7"],
)
def test_unit_folders_verify_every_file(unit: str) -> None:
    result = inspect_checkpoint(str(TRAINER_FIXTURES / unit), verify=True)
    checked = result.facts["verified_files"]["checked"]
    assert result.complete and result.facts["verified_files"]["not_checkable"] == []
    on_disk = {p.name for p in (TRAINER_FIXTURES / unit).iterdir()} - {"model.safetensors"}
    assert set(checked) == on_disk
    assert {k: v for k, v in checked.items() if not k.endswith(".json")} == {
        name: "torch zip" for name in on_disk if not name.endswith(".json")
    }


def test_optimizer_moments_are_not_parameters() -> None:
    """HF optimizer.pt: 0 parameters; its moments belong to exactly the model's 856 parameters."""
    unit = TRAINER_FIXTURES / "hf-trainer" / "checkpoint-30"
    model = inspect_checkpoint(str(unit / "model.safetensors"))
    optimizer = inspect_checkpoint(str(unit / "optimizer.pt"))
    assert model.parameters == 856 and optimizer.parameters == 0
    assert optimizer.facts["optimizer"]["tracked_elements"] == model.parameters
    assert optimizer.totals()["by_role"]["optimizer"]["elements"] == 2 * 856 + 11
    rng = inspect_checkpoint(str(unit / "rng_state.pth"))
    assert rng.parameters == 0 and set(rng.facts["rng_state"]) == {"python", "numpy", "cpu"}
    assert inspect_checkpoint(str(unit / "scheduler.pt")).facts["content"] == "scheduler"


@pytest.mark.parametrize("name", ["dtypes.pt", "step_10.pt", "step_50.pt"])
def test_legacy_reads_as_the_zip_of_the_same_loop(name: str) -> None:
    legacy = inspect_checkpoint(str(TRAINER_FIXTURES / "torch-legacy" / name), verify=True)
    zipped = inspect_checkpoint(str(TRAINER_FIXTURES / "torch-zip" / name), verify=True)
    assert [(t.name, t.dtype, t.shape, t.role) for t in legacy.tensors] == [
        (t.name, t.dtype, t.shape, t.role) for t in zipped.tensors
    ]
    assert legacy.parameters == zipped.parameters and legacy.facts["content"] == zipped.facts["content"]
    if name == "dtypes.pt":
        described = run_entry("torch-legacy")["trainer"]["dtypes.pt"]
        for tensor in legacy.tensors:
            if tensor.name in described:
                assert (tensor.dtype, list(tensor.shape)) == (
                    described[tensor.name]["dtype"],
                    described[tensor.name]["shape"],
                ), tensor.name
    else:
        assert legacy.parameters == 51 and legacy.metadata["step"] == int(name[5:7])


LIGHTNING_FILES = sorted(p for p in CHECKPOINT_FILES if p.suffix == ".ckpt")


@pytest.mark.parametrize("path", LIGHTNING_FILES, ids=_rel)
def test_lightning_meta_matches_what_lightning_kept(path: Path) -> None:
    meta = read_lightning_meta(_source(path))
    run, version = _rel(path).split("/")[0], path.parts[-3]
    fit = next(f for f in run_entry(run)["trainer"]["fits"] if f["version_dir"].endswith(version))
    assert (meta.monitor, meta.mode) == (fit["monitor"], fit["mode"])
    named = re.search(r"step=(\d+)", path.name)
    assert meta.global_step == (int(named.group(1)) if named else fit["global_step"])
    kept = {Path(k).name: v for k, v in fit["best_k_models"].items()}
    if path.name in kept:  # a top-k file carries its own monitored value
        assert meta.current_score == kept[path.name]
        assert meta.best_k_models[path.name] == kept[path.name]
    if path.name == "last.ckpt" or meta.global_step == fit["global_step"]:
        # The last save knows the final top k (as the manifest has it, from the callback at the end).
        assert meta.best_k_models == kept
        assert (
            meta.best_model_path is not None
            and Path(meta.best_model_path).name == Path(fit["best_model_path"]).name
        )
