"""A small example training run that ckptctl writes itself, so every command can be tried with no checkpoints
of one's own: an HF Trainer output folder with real safetensors weights, ``trainer_state.json`` eval metrics,
and one half-written checkpoint (truncated weights, no ``trainer_state.json``), as a crash leaves it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ckptctl.errors import RefusedError

EXAMPLE_STEPS = (100, 200, 300, 400, 500)
HALF_WRITTEN_STEP = 600
EVAL_LOSS = {100: 2.31, 200: 1.87, 300: 1.62, 400: 1.66, 500: 1.71, 600: 1.69}
_HIDDEN, _INTER, _LAYERS, _VOCAB = 64, 172, 2, 256
_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": _HIDDEN,
    "intermediate_size": _INTER,
    "num_hidden_layers": _LAYERS,
    "num_attention_heads": 4,
    "vocab_size": _VOCAB,
    "torch_dtype": "float32",
}


def _weights(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    hidden, inter, vocab = _HIDDEN, _INTER, _VOCAB
    tensors = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden), dtype=np.float32)}
    for layer in range(_LAYERS):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{name}.weight"] = rng.standard_normal(
                (hidden, hidden), dtype=np.float32
            )
        tensors[f"{prefix}.mlp.gate_proj.weight"] = rng.standard_normal((inter, hidden), dtype=np.float32)
        tensors[f"{prefix}.mlp.up_proj.weight"] = rng.standard_normal((inter, hidden), dtype=np.float32)
        tensors[f"{prefix}.mlp.down_proj.weight"] = rng.standard_normal((hidden, inter), dtype=np.float32)
        tensors[f"{prefix}.input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
    tensors["model.norm.weight"] = np.ones(hidden, dtype=np.float32)
    tensors["lm_head.weight"] = rng.standard_normal((vocab, hidden), dtype=np.float32)
    return tensors


def _trainer_state(step: int) -> dict[str, object]:
    history: list[dict[str, float | int]] = []
    best_step = None
    for logged in range(50, step + 1, 50):
        history.append({"step": logged, "epoch": logged / 1000, "loss": round(3.0 - logged / 400, 4)})
        if logged in EVAL_LOSS:
            history.append({"step": logged, "epoch": logged / 1000, "eval_loss": EVAL_LOSS[logged]})
            if best_step is None or EVAL_LOSS[logged] < EVAL_LOSS[best_step]:
                best_step = logged
    return {
        "global_step": step,
        "epoch": step / 1000,
        "best_metric": EVAL_LOSS[best_step] if best_step else None,
        "best_global_step": best_step,
        "best_model_checkpoint": f"/scratch/example-run/checkpoint-{best_step}",
        "log_history": history,
        "save_steps": 100,
        "max_steps": 1000,
    }


def _age(folder: Path, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (stamp, stamp))


def write_example_run(target: str | os.PathLike[str]) -> Path:
    """Write the example run into ``target`` (a new or empty local folder) and return its path.

    Checkpoints are dated one hour apart in the past, so none is still settling; the last one is half-written.
    """
    root = Path(target)
    if root.exists() and any(root.iterdir()):
        raise RefusedError(f"{root} exists and is not empty; the example needs a new folder", url=str(root))
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(_CONFIG, indent=2))
    every = (*EXAMPLE_STEPS, HALF_WRITTEN_STEP)
    for index, step in enumerate(every):
        unit = root / f"checkpoint-{step}"
        unit.mkdir()
        (unit / "config.json").write_text(json.dumps(_CONFIG, indent=2))
        save_file(_weights(step), str(unit / "model.safetensors"), metadata={"format": "pt"})
        if step == HALF_WRITTEN_STEP:
            # A crash mid-save: the weights stop short and trainer_state.json was never written.
            weights = unit / "model.safetensors"
            with weights.open("r+b") as handle:
                handle.truncate(weights.stat().st_size // 3)
        else:
            (unit / "trainer_state.json").write_text(json.dumps(_trainer_state(step), indent=2))
        _age(unit, (len(every) - index) * 3600)
    return root
