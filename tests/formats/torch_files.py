"""Real torch.save files, made by torch at test time in one subprocess (torch is imported there only).

Each state is saved in both serializations — the zip archive (torch's default) and the legacy format
(``_use_new_zipfile_serialization=False``) — exactly as the trainers save them: HF Trainer's ``optimizer.pt``,
``scheduler.pt`` and ``rng_state.pth`` (its own ``{"python", "numpy", "cpu"}`` dict), Accelerate's
``random_states_0.pkl`` (torch.save) and a plain ``pickle.dump`` RNG file, the tutorial
``{"step", "model_state_dict", "optimizer_state_dict"}`` file, a whole ``nn.Module`` and a dataclass (as
``training_args.bin`` is), and a Lightning 2.6 ``.ckpt`` dict (``ModelCheckpoint.state_dict`` keys and state
key). ``manifest.json`` records what torch itself says about each file: every tensor's dtype, shape and the
sha256 of its bytes, and the model's parameter count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

GENERATOR = r'''
import dataclasses, hashlib, json, os, pickle, random, sys
from pathlib import Path

import numpy as np
import torch

out = Path(sys.argv[1])
torch.manual_seed(0)
random.seed(0)
np.random.seed(0)
manifest = {}


def flatten(value, path=()):
    if isinstance(value, torch.Tensor):
        yield ".".join(str(p) for p in path), value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, (*path, key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from flatten(item, (*path, index))


def raw(tensor):
    tensor = tensor.detach().contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def save(obj, name=None, legacy_name=None, **extra):
    paths = ([(name, True)] if name else []) + ([(legacy_name, False)] if legacy_name else [])
    for path, zipped in paths:
        torch.save(obj, out / path, _use_new_zipfile_serialization=zipped)
        manifest[path] = {
            "tensors": [
                {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                 "sha256": hashlib.sha256(raw(t)).hexdigest()}
                for n, t in flatten(obj)
            ],
            **extra,
        }


model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
parameters = sum(p.numel() for p in model.parameters())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
for _ in range(2):
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    scheduler.step()

weights = dict(model.state_dict())
base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
weights.update({
    "extra.bf16": torch.randn(5, dtype=torch.bfloat16),
    "extra.f16": torch.randn(2, 3).half(),
    "extra.i64": torch.arange(7),
    "extra.u16": torch.tensor([1, 2, 3], dtype=torch.uint16),
    "extra.f8": torch.randn(4).to(torch.float8_e4m3fn),
    "extra.bool": torch.tensor([True, False]),
    "extra.view": base[1],
    "extra.base": base,
    "extra.empty": torch.zeros(0, 4),
    "extra.scalar": torch.tensor(2.5),
})
save(weights, "weights.pt", "weights-legacy.pt", parameters=sum(t.numel() for t in weights.values()) - 4)
save(optimizer.state_dict(), "optimizer.pt", "optimizer-legacy.pt", model_parameters=parameters)
save(scheduler.state_dict(), "scheduler.pt", "scheduler-legacy.pt")
hf_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
save(hf_rng, "rng_state.pth", "rng_state-legacy.pth")
accelerate_rng = {
    "step": 7,
    "random_state": random.getstate(),
    "numpy_random_seed": np.random.get_state(),
    "torch_manual_seed": torch.get_rng_state(),
}
save(accelerate_rng, "random_states_0.pkl")
with open(out / "random_states_plain.pkl", "wb") as handle:
    pickle.dump({"step": 7, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                 "scale": np.float64(0.25), "count": np.int64(3)}, handle)
tutorial = {"step": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
save(tutorial, "tutorial.pt", "tutorial-legacy.pt", model_parameters=parameters)
torch.save(model, out / "module-legacy.pt", _use_new_zipfile_serialization=False)


@dataclasses.dataclass
class TrainingArgs:
    output_dir: str = "out"
    learning_rate: float = 5e-5
    seed: int = 42


save(TrainingArgs(), "training_args.bin", "training_args-legacy.bin")

torch.save({"a": torch.ones(3)}, out / "proto4-legacy.pt", _use_new_zipfile_serialization=False, pickle_protocol=4)


class Evil:
    """Unpickling this runs ``touch MARKER`` (the classic payload); nothing ckptctl does may create it."""

    def __reduce__(self):
        return (os.system, (f"touch {out / 'MARKER'}",))


for zipped, name in ((True, "evil.pt"), (False, "evil-legacy.pt")):
    torch.save({"w": torch.ones(2), "payload": Evil()}, out / name, _use_new_zipfile_serialization=zipped)

many = {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(3000)}
save(many, legacy_name="many-legacy.pt")
large = {f"block.{i}": torch.randn(100_000) for i in range(3)}
save(large, "large.pt", "large-legacy.pt")

state_key = ("ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
             "'every_n_epochs': 1, 'train_time_interval': None}")
root = "/home/user/run/lightning_logs/version_0/checkpoints"
scores = {f"{root}/epoch=0-step=10.ckpt": torch.tensor(4.7999), f"{root}/epoch=1-step=20.ckpt": torch.tensor(4.6658)}
current = torch.tensor(4.5969)
scores[f"{root}/epoch=2-step=30.ckpt"] = current
lightning = {
    "epoch": 2,
    "global_step": 30,
    "pytorch-lightning_version": "2.6.6",
    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 2}}}},
    "callbacks": {
        "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {"wait_count": 0, "best_score": torch.tensor(4.5969)},
        state_key: {
            "monitor": "val_loss",
            "best_model_score": current,
            "best_model_path": f"{root}/epoch=2-step=30.ckpt",
            "current_score": current,
            "dirpath": root,
            "best_k_models": scores,
            "kth_best_model_path": f"{root}/epoch=0-step=10.ckpt",
            "kth_value": torch.tensor(4.7999),
            "last_model_path": "",
        },
    },
    "optimizer_states": [optimizer.state_dict()],
    "lr_schedulers": [scheduler.state_dict()],
    "hparams_name": "kwargs",
    "hyper_parameters": {"lr": 0.001, "hidden": 16},
}
save(lightning, "epoch=2-step=30.ckpt", "epoch=2-step=30-legacy.ckpt", model_parameters=parameters)
big = {**lightning, "state_dict": {f"model.layer.{i}": torch.randn(50_000) for i in range(10)}}
save(big, "big.ckpt", "big-legacy.ckpt")
(out / "manifest.json").write_text(json.dumps(manifest))
'''


def make_torch_files(folder: Path) -> dict[str, Any]:
    """Write every file of ``GENERATOR`` into ``folder``; returns its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", GENERATOR, str(folder)], check=True, capture_output=True)
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return manifest


_MADE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of generated torch files (read-only by convention: copy a file before changing it).

    Test modules import this fixture, and pytest then keeps one per module: the folder is made once per session
    all the same (torch takes seconds to import)."""
    if "folder" not in _MADE:
        folder = tmp_path_factory.mktemp("torch-files")
        make_torch_files(folder)
        _MADE["folder"] = folder
    return _MADE["folder"]


def manifest(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return data
