"""PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (fixtures/lora/README.md).

The config says what the tensors cannot (alpha, rsLoRA, the base model); the tensors say what the config only
claims (the rank each module really has). Both are small, so both are read whole.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ckptctl.errors import IntegrityError
from ckptctl.formats.model import Defect, TensorInfo
from ckptctl.storage.location import Location

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_A = re.compile(r"^(?P<module>.+)\.lora_(?:A\.weight|embedding_A)$")


def read_adapter_config(location: Location, rel: str = ADAPTER_CONFIG) -> dict[str, Any]:
    try:
        config = json.loads(location.read_bytes(rel))
    except ValueError as exc:
        raise IntegrityError(f"{rel}: not valid JSON ({exc})", url=location.url_of(rel)) from None
    if not isinstance(config, dict):
        raise IntegrityError(f"{rel}: not a JSON object", url=location.url_of(rel))
    return config


def _rank_for(module: str, config: dict[str, Any]) -> int | None:
    """The configured rank of a module: ``rank_pattern`` keys are regexes matched as ``(.*\\.)?(key)$``."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return int(rank)
    r = config.get("r")
    return int(r) if isinstance(r, int) else None


def peft_facts(
    config: dict[str, Any], tensors: tuple[TensorInfo, ...], weights_file: str
) -> tuple[dict[str, Any], list[Defect]]:
    """The adapter's settings and size, and a defect for every LoRA A whose rank disagrees with the config."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    scaling = None
    if isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)):
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    targets = config.get("target_modules")
    defects = []
    modules = []
    for tensor in tensors:
        match = _LORA_A.match(tensor.name)
        if not match or not tensor.shape:
            continue
        module = match.group("module")
        modules.append(module)
        expected = _rank_for(module, config)
        if expected is not None and tensor.shape[0] != expected:
            defects.append(
                Defect(
                    weights_file,
                    f"{tensor.name} has rank {tensor.shape[0]}, adapter_config.json says {expected}",
                )
            )
    facts = {
        "peft_type": config.get("peft_type"),
        "r": r,
        "lora_alpha": alpha,
        "scaling": scaling,
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "modules_to_save": config.get("modules_to_save"),
        "rank_pattern": config.get("rank_pattern") or {},
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "peft_version": config.get("peft_version"),
        "adapted_modules": len(modules),
    }
    return facts, defects
