"""Mode 2 of ``extract-lora``: a LoRA adapter that approximates ``tuned - base`` by truncated SVD, module by module.

For each module whose weight changed: Linear uses ΔW (out, in); GPT-2's Conv1D and embeddings use ΔWᵀ (embeddings
become ``lora_embedding_A/B``). ``U S Vᵀ ≈ M`` by randomized SVD (``torch.svd_lowrank``: oversampling and power
iterations; a full SVD when the matrix is small), ``A = √S Vᵀ``, ``B = U √S`` and ``lora_alpha = r`` so the scale
is 1. Bias deltas of those modules become ``lora_B.bias`` with ``"lora_bias": true`` (without the flag PEFT silently
ignores them); every other changed tensor sends its module to ``modules_to_save``. Only one module's pair of
tensors is in memory at a time, plus the adapter being built.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptctl.convert.lora import (
    PREFIX,
    WriteResult,
    checked_out_dir,
    module_names,
    target_modules_for,
    write_adapter,
)
from ckptctl.errors import BackendNotInstalledError, IntegrityError, UsageError
from ckptctl.formats.sources import open_state_dict
from ckptctl.formats.tensor_layout import TensorSource
from ckptctl.storage.location import Location

EMBEDDING_LEAVES = {
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "embed_in",
    "embeddings",
    "tok_embeddings",
}
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc"}  # GPT-2 style models store these (in, out)
FULL_SVD_BELOW = 1024  # min(out, in) under which an exact SVD costs little


@dataclass
class ModuleReport:
    module: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    relative_error: float
    seconds: float


@dataclass
class SvdResult:
    write: WriteResult
    modules: list[ModuleReport]
    saved_modules: list[str]
    model_bytes: int
    adapter_bytes: int
    notes: list[str] = field(default_factory=list)


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BackendNotInstalledError(
            "extract-lora --base/--tuned (SVD) needs torch", hint="pip install 'ckptctl[torch]'"
        ) from exc
    return torch


def low_rank(
    matrix: Any, *, rank: int | None, energy: float | None, oversample: int = 8, power_iterations: int = 2
) -> tuple[Any, Any, float]:
    """(A, B, relative error) with ``B @ A ≈ matrix``: of a fixed rank, or of the smallest rank whose retained
    Frobenius norm √(Σ_{i≤k} s_i² / Σ s_i²) reaches ``energy`` (kohya's "fro retained"; error = √(1 − energy²))."""
    torch = _torch()
    smaller = min(matrix.shape)
    total = float((matrix.double() ** 2).sum())
    wanted = min(rank, smaller) if rank else None
    if smaller <= FULL_SVD_BELOW or (wanted and wanted + oversample >= smaller // 2):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        q = min(smaller, (wanted or 32) + oversample)
        while True:
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=q, niter=power_iterations)
            vh = v.T
            kept = float((s.double() ** 2).sum())
            if wanted or q >= smaller or kept >= (energy or 0) ** 2 * total:
                break
            q = min(smaller, 2 * q)
    if wanted:
        k = min(wanted, s.numel())
    else:
        cumulative = torch.cumsum(s.double() ** 2, 0)
        k = (
            int(
                torch.searchsorted(
                    cumulative, torch.tensor((energy or 1.0) ** 2 * total * (1 - 1e-12), dtype=torch.float64)
                ).item()
            )
            + 1
        )
        k = max(1, min(k, s.numel()))
    root = s[:k].sqrt()
    a = (root[:, None] * vh[:k]).contiguous()
    b = (u[:, :k] * root[None, :]).contiguous()
    norm = math.sqrt(total)
    error = float(torch.linalg.norm(matrix - b @ a)) / norm if norm else 0.0
    return a, b, error


def _model_type(location: Location) -> str | None:
    for candidate in (location, location.parent()):
        try:
            if candidate.exists("config.json"):
                return str(json.loads(candidate.read_bytes("config.json")).get("model_type") or "") or None
        except Exception:
            continue
    return None


def _architecture_task(location: Location) -> str | None:
    try:
        config = json.loads(location.read_bytes("config.json"))
    except Exception:
        return None
    if any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or []):
        return "CAUSAL_LM"
    return None


def _check_pair(base: dict[str, TensorSource], tuned: dict[str, TensorSource]) -> None:
    for key in sorted(set(base) | set(tuned)):
        if key not in tuned:
            raise UsageError(f"base and tuned differ: {key} is in the base model only")
        if key not in base:
            raise UsageError(f"base and tuned differ: {key} is in the tuned model only")
        if base[key].shape != tuned[key].shape:
            raise UsageError(
                f"base and tuned differ: {key} is {list(base[key].shape)} in the base, "
                f"{list(tuned[key].shape)} in the tuned model"
            )


def extract_by_svd(
    base: Location,
    tuned: Location,
    out_dir: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    task_type: str | None = None,
    base_model: str | None = None,
    force: bool = False,
    on_module: Callable[[ModuleReport], None] | None = None,
) -> SvdResult:
    """Mode 2: approximate ``tuned - base`` by a LoRA adapter written to ``out_dir``."""
    import time

    if (rank is None) == (energy is None):
        raise UsageError("give one of --rank R and --energy F")
    if rank is not None and rank < 1:
        raise UsageError("--rank must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError("--energy is a fraction in (0, 1], e.g. 0.9")
    checked_out_dir(out_dir, force=force)
    torch = _torch()
    base_tensors, _ = open_state_dict(base)
    tuned_tensors, _ = open_state_dict(tuned)
    _check_pair(base_tensors, tuned_tensors)
    conv1d = _model_type(tuned) == "gpt2" or _model_type(base) == "gpt2"

    by_module: dict[str, list[str]] = {}
    for key in sorted(tuned_tensors):
        by_module.setdefault(key.rsplit(".", 1)[0], []).append(key)
    adapter: dict[str, np.ndarray] = {}
    reports: list[ModuleReport] = []
    saved: list[str] = []
    bias_deltas: dict[str, np.ndarray] = {}
    for module, keys in by_module.items():
        changed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key in keys:
            old, new = base_tensors[key].array(), tuned_tensors[key].array()
            if not np.array_equal(old, new):
                changed[key] = (old, new)
        if not changed:
            continue
        weight_key = f"{module}.weight"
        leaf = module.rsplit(".", 1)[-1]
        other = [k for k in changed if k not in (weight_key, f"{module}.bias")]
        if weight_key in changed and changed[weight_key][0].ndim == 2 and not other:
            started = time.perf_counter()
            old, new = changed[weight_key]
            delta = torch.from_numpy(new.astype(np.float32) - old.astype(np.float32))
            kind = (
                "embedding"
                if leaf in EMBEDDING_LEAVES
                else "conv1d"
                if conv1d and leaf in CONV1D_LEAVES
                else "linear"
            )
            matrix = delta if kind == "linear" else delta.T.contiguous()
            a, b, error = low_rank(matrix, rank=rank, energy=energy)
            name = f"{PREFIX}{module}"
            if kind == "embedding":
                adapter[f"{name}.lora_embedding_A"] = a.numpy().astype(np.float32)
                adapter[f"{name}.lora_embedding_B"] = b.numpy().astype(np.float32)
            else:
                adapter[f"{name}.lora_A.weight"] = a.numpy().astype(np.float32)
                adapter[f"{name}.lora_B.weight"] = b.numpy().astype(np.float32)
                if f"{module}.bias" in changed:
                    old_bias, new_bias = changed[f"{module}.bias"]
                    bias_deltas[module] = new_bias.astype(np.float32) - old_bias.astype(np.float32)
            report = ModuleReport(
                module, kind, tuple(old.shape), a.shape[0], error, time.perf_counter() - started
            )
            reports.append(report)
            if on_module:
                on_module(report)
        else:  # a norm, a bias alone, anything not a matrix: the whole module is saved as trained
            saved.append(module)
            for key in keys:
                adapter[f"{PREFIX}{key}"] = tuned_tensors[key].array()
    if not reports and not saved:
        raise UsageError("base and tuned are identical: there is nothing to extract")
    notes = []
    if bias_deltas:
        # PEFT gives every targeted Linear a lora_B bias once lora_bias is on: zeros where nothing changed.
        for report in reports:
            if report.kind == "embedding":
                continue
            out_features = report.shape[1] if report.kind == "conv1d" else report.shape[0]
            value = bias_deltas.get(report.module, np.zeros(out_features, dtype=np.float32))
            adapter[f"{PREFIX}{report.module}.lora_B.bias"] = value.astype(np.float32)
        notes.append(f"{len(bias_deltas)} bias delta(s) written as lora_B.bias with lora_bias=true")
    ranks = {r.module: r.rank for r in reports}
    r = max(ranks.values()) if ranks else 1
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": task_type or _architecture_task(tuned) or _architecture_task(base),
        "base_model_name_or_path": base_model or base.url,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": target_modules_for(set(ranks), module_names(base_tensors)),
        "modules_to_save": saved or None,
        "use_dora": False,
        "fan_in_fan_out": any(r.kind == "conv1d" for r in reports),
        "bias": "none",
        "lora_bias": bool(bias_deltas),
        "inference_mode": True,
        "init_lora_weights": True,
    }
    written = write_adapter(
        adapter,
        config,
        out_dir,
        force=force,
        chunks_of=lambda array: iter([np.ascontiguousarray(array).tobytes()]),
        dtype_of=lambda array: "float32" if array.dtype == np.float32 else str(array.dtype),
        shape_of=lambda array: tuple(array.shape),
    )
    model_bytes = sum(t.nbytes for t in tuned_tensors.values())
    if not np.isfinite([r.relative_error for r in reports] or [0.0]).all():
        raise IntegrityError("the SVD produced non-finite values (NaN or inf in the weights?)")
    return SvdResult(written, reports, saved, model_bytes, written.bytes, notes)
