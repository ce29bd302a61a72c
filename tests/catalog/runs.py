"""Builders of runs in each trainer family's real on-disk layout (file names and markers as the trainers write
them; see shared/notes/retention-and-layouts.md §2), with the status ckptctl must report for each unit.

Each builder writes into a local folder and returns ``{unit path: (layout, step, status)}``. Weights are real
files where it matters to the catalog: torch zip archives made by torch itself (from shared/fixtures) and
safetensors files made by the safetensors library.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.conftest import SHARED_FIXTURES

Expected = dict[str, tuple[str, int | None, str]]
TORCH_FILE = SHARED_FIXTURES / "lora" / "lora_basic" / "full_state_dict.pt"


def write(path: Path, data: bytes | str = b"x" * 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def torch_file(path: Path, *, truncate: bool = False) -> None:
    """A real torch.save zip archive (or its first half, as an interrupted save leaves it)."""
    data = TORCH_FILE.read_bytes()
    write(path, data[: len(data) // 2] if truncate else data)


def safetensors_file(path: Path, *, truncate: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(path))
    if truncate:
        with path.open("r+b") as handle:
            handle.truncate(path.stat().st_size - 40)


def age_tree(root: Path, seconds: float = 7200) -> None:
    """Date every file in the past so that no unit is still settling."""
    stamp = time.time() - seconds
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (stamp, stamp))


def hf_trainer(root: Path) -> Expected:
    for step in (100, 200, 300):
        unit = root / f"checkpoint-{step}"
        safetensors_file(unit / "model.safetensors")
        for name in ("config.json", "generation_config.json"):
            write(unit / name, "{}")
        torch_file(unit / "optimizer.pt")
        for name in ("scheduler.pt", "rng_state.pth", "training_args.bin"):
            write(unit / name)
        if step != 300:
            history = [{"step": s, "eval_loss": 3.0 - s / 100} for s in (100, 200)]
            state = {
                "global_step": step,
                "log_history": history,
                "best_model_checkpoint": "/nfs/x/checkpoint-200",
            }
            write(unit / "trainer_state.json", json.dumps(state))
    # HF Trainer + DeepSpeed: the ZeRO tag, latest and zero_to_fp32.py nest inside checkpoint-N.
    nested = root / "checkpoint-50"
    write(nested / "global_step50" / "mp_rank_00_model_states.pt")
    write(nested / "global_step50" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write(nested / "latest", "global_step50")
    write(nested / "zero_to_fp32.py", "# converter")
    write(nested / "trainer_state.json", json.dumps({"global_step": 50, "log_history": []}))
    write(nested / "config.json", "{}")
    return {
        "checkpoint-50": ("hf-trainer", 50, "complete"),
        "checkpoint-100": ("hf-trainer", 100, "complete"),
        "checkpoint-200": ("hf-trainer", 200, "complete"),
        "checkpoint-300": ("hf-trainer", 300, "incomplete"),
    }


def deepspeed(root: Path) -> Expected:
    """The real DeepSpeed save dir from shared/fixtures, plus a tag newer than ``latest`` and a tag with a
    missing rank file."""
    shutil.copytree(SHARED_FIXTURES / "zero" / "z2-bf16-tied-frozen" / "checkpoint", root, dirs_exist_ok=True)
    source = root / "global_step3"
    newer = root / "global_step6"
    shutil.copytree(source, newer)
    broken = root / "global_step1"
    shutil.copytree(source, broken)
    (broken / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    return {
        "global_step1": ("deepspeed", 1, "incomplete"),
        "global_step3": ("deepspeed", 3, "complete"),
        "global_step6": ("deepspeed", 6, "in-progress"),
    }


def torchtitan(root: Path) -> Expected:
    """torchtitan's ``checkpoint/step-N`` DCP folders: the real fixture, one without ``.metadata`` (crashed
    before rank 0 renamed it) and one with only ``.metadata.tmp``."""
    base = root / "checkpoint"
    shutil.copytree(SHARED_FIXTURES / "dcp" / "torchtitan-fsdp2" / "checkpoint" / "step-3", base / "step-3")
    shutil.copytree(base / "step-3", base / "step-6")
    (base / "step-6" / ".metadata").unlink()
    shutil.copytree(base / "step-3", base / "step-9")
    (base / "step-9" / ".metadata").rename(base / "step-9" / ".metadata.tmp")
    write(root / "config.toml", "[job]")
    return {
        "checkpoint/step-3": ("dcp", 3, "complete"),
        "checkpoint/step-6": ("dcp", 6, "incomplete"),
        "checkpoint/step-9": ("dcp", 9, "incomplete"),
    }


def lightning(root: Path) -> Expected:
    ckpts = root / "lightning_logs" / "version_0" / "checkpoints"
    torch_file(ckpts / "epoch=0-step=100-val_loss=1.2345.ckpt")
    torch_file(ckpts / "epoch=1-step=200-val_loss=0.9876.ckpt")
    torch_file(ckpts / "epoch=2-step=300-val_loss=0.8000.ckpt", truncate=True)
    write(root / "lightning_logs" / "version_0" / "hparams.yaml", "lr: 0.1")
    write(root / "lightning_logs" / "version_0" / "metrics.csv", "step,val_loss\n")
    prefix = "lightning_logs/version_0/checkpoints/"
    return {
        prefix + "epoch=0-step=100-val_loss=1.2345.ckpt": ("lightning", 100, "complete"),
        prefix + "epoch=1-step=200-val_loss=0.9876.ckpt": ("lightning", 200, "complete"),
        prefix + "epoch=2-step=300-val_loss=0.8000.ckpt": ("lightning", 300, "incomplete"),
    }


def megatron(root: Path) -> Expected:
    for iteration in (100, 200, 300):
        torch_file(root / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt")
    write(root / "latest_checkpointed_iteration.txt", "200")
    return {
        "iter_0000100": ("megatron", 100, "complete"),
        "iter_0000200": ("megatron", 200, "complete"),
        "iter_0000300": ("megatron", 300, "in-progress"),
    }


def megatron_release(root: Path) -> Expected:
    """A converted Megatron checkpoint: ``release/`` named by the tracker instead of an iteration."""
    torch_file(root / "release" / "mp_rank_00" / "model_optim_rng.pt")
    write(root / "latest_checkpointed_iteration.txt", "release")
    return {"release": ("megatron", None, "complete")}


def orbax(root: Path) -> Expected:
    write(root / "100" / "_CHECKPOINT_METADATA", json.dumps({"commit_timestamp_nsecs": 1}))
    write(root / "100" / "state" / "manifest.ocdbt")
    write(root / "200" / "commit_success.txt", "done")
    write(root / "200" / "state" / "manifest.ocdbt")
    write(root / "300.orbax-checkpoint-tmp-1732000000" / "state" / "manifest.ocdbt")
    write(root / "400" / "state" / "manifest.ocdbt")
    return {
        "100": ("orbax", 100, "complete"),
        "200": ("orbax", 200, "complete"),
        "300.orbax-checkpoint-tmp-1732000000": ("orbax", 300, "in-progress"),
        "400": ("orbax", 400, "incomplete"),
    }


def open_instruct(root: Path) -> Expected:
    for step in (100, 200):
        safetensors_file(root / f"step_{step}" / "model.safetensors")
    write(root / "step_100" / "COMPLETED", "")
    return {
        "step_100": ("open-instruct", 100, "complete"),
        "step_200": ("open-instruct", 200, "incomplete"),
    }


def olmo_core(root: Path) -> Expected:
    for name in ("step100", "step300"):
        write(root / name / "model_and_optim" / ".metadata")
        write(root / name / "model_and_optim" / "__0_0.distcp")
        write(root / name / "train" / "rank0.pt")
    write(root / "step100" / ".metadata.json", json.dumps({"ephemeral": False}))
    write(root / "step200-tmp" / "model_and_optim" / "__0_0.distcp")
    return {
        "step100": ("olmo-core", 100, "complete"),
        "step200-tmp": ("olmo-core", 200, "in-progress"),
        "step300": ("olmo-core", 300, "incomplete"),
    }


def nemo(root: Path) -> Expected:
    ckpts = root / "checkpoints"
    names = {
        100: "megatron_gpt--val_loss=1.23-step=100-consumed_samples=800",
        200: "megatron_gpt--val_loss=1.10-step=200-consumed_samples=1600-last",
        300: "megatron_gpt--val_loss=1.05-step=300-consumed_samples=2400",
    }
    for name in names.values():
        write(ckpts / name / "weights" / ".metadata")
        write(ckpts / name / "weights" / "__0_0.distcp")
        write(ckpts / name / "context" / "model.yaml", "a: 1")
    write(ckpts / f"{names[300]}-unfinished", "")
    return {
        f"checkpoints/{names[100]}": ("nemo", 100, "complete"),
        f"checkpoints/{names[200]}": ("nemo", 200, "complete"),
        f"checkpoints/{names[300]}": ("nemo", 300, "in-progress"),
    }


def plain_files(root: Path) -> Expected:
    torch_file(root / "step_100.pt")
    torch_file(root / "step_200.pt", truncate=True)
    torch_file(root / "epoch_3.pt")
    safetensors_file(root / "model_step_400.safetensors")
    safetensors_file(root / "model_step_500.safetensors", truncate=True)
    write(root / "empty_step_600.pt", b"")
    write(root / "notes.bak", "not a checkpoint")
    return {
        "step_100.pt": ("file", 100, "complete"),
        "step_200.pt": ("file", 200, "incomplete"),
        "epoch_3.pt": ("file", None, "complete"),
        "model_step_400.safetensors": ("file", 400, "complete"),
        "model_step_500.safetensors": ("file", 500, "incomplete"),
        "empty_step_600.pt": ("file", 600, "incomplete"),
        "notes.bak": ("unknown", None, "unknown"),
    }


FAMILIES: dict[str, Callable[[Path], Expected]] = {
    "hf-trainer": hf_trainer,
    "deepspeed": deepspeed,
    "torchtitan": torchtitan,
    "lightning": lightning,
    "megatron": megatron,
    "megatron-release": megatron_release,
    "orbax": orbax,
    "open-instruct": open_instruct,
    "olmo-core": olmo_core,
    "nemo": nemo,
    "plain-files": plain_files,
}
