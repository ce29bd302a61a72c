"""A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) out of a training checkpoint.

The key mapping is PEFT's own ``get_peft_model_state_dict`` (see ``shared/fixtures/lora/README.md``): strip DDP
(``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes, keep the wanted adapter's keys and drop its name.
Only those tensors are read (by byte ranges), so time and memory scale with the adapter, not the model. The
config takes what the weights tell (r, rank_pattern, target_modules, DoRA, modules_to_save, fan_in_fan_out,
lora_bias) and what they cannot (alpha, rslora, bias mode, task type, base model) from an adapter_config.json
beside or above SRC, or from flags; an unknown alpha is an error, never a guess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptctl.convert.safetensors_writer import PlannedTensor, SafetensorsStream
from ckptctl.errors import NotFoundError, PermissionDeniedError, RefusedError, UsageError
from ckptctl.formats.peft import ADAPTER_CONFIG, check_adapter_config, read_adapter_config
from ckptctl.formats.sources import open_state_dict
from ckptctl.formats.tensor_layout import TensorSource
from ckptctl.storage.atomic import (
    commit_folder,
    disk_error,
    durable_new_file,
    partial_folder,
    prepare_partial_folder,
)
from ckptctl.storage.location import Location, is_url, refuse_overlap

PREFIX = "base_model.model."
WRAPPERS = ("module.", "_orig_mod.")
# safetensors writes tensors sorted by dtype (its enum order, largest first), then by name: so do we, so that
# the file is byte-identical to what PEFT's save_pretrained writes.
_DTYPE_RANK = {
    name: rank
    for rank, name in enumerate(
        ["bool", "uint8", "int8", "float8_e5m2", "float8_e4m3fn", "int16", "uint16", "float16", "bfloat16",
         "int32", "uint32", "float32", "float64", "int64", "uint64"]
    )
}  # fmt: skip
_LORA = re.compile(
    r"^(?P<module>.+)\.(?:(?P<ab>lora_[AB])\.(?P<n1>[^.]+)\.(?P<param>weight|bias)"
    r"|(?P<emb>lora_embedding_[AB])\.(?P<n2>[^.]+)"
    r"|lora_magnitude_vector\.(?P<n3>[^.]+)(?:\.weight)?"
    r"|modules_to_save\.(?P<n4>[^.]+)\.(?P<mparam>.+))$"
)
# What the weights cannot tell, with PEFT's defaults where a default is harmless.
UNKNOWABLE_DEFAULTS: dict[str, Any] = {
    "use_rslora": False,
    "alpha_pattern": {},
    "bias": "none",
    "task_type": None,
    "base_model_name_or_path": None,
    "lora_dropout": 0.0,
}


def strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for wrapper in WRAPPERS:
            if name.startswith(wrapper):
                name, changed = name[len(wrapper) :], True
    return name


def safetensors_order(tensors: Iterable[PlannedTensor]) -> list[PlannedTensor]:
    return sorted(tensors, key=lambda t: (-_DTYPE_RANK.get(t.dtype, 0), t.name))


@dataclass
class AdapterPlan:
    """What will be written: adapter key -> source tensor, and the config."""

    tensors: dict[str, TensorSource]
    config: dict[str, Any]
    adapter_name: str
    source: str
    notes: list[str] = field(default_factory=list)


def adapter_names(keys: Iterable[str]) -> set[str]:
    names = set()
    for key in keys:
        found = _LORA.match(key)
        if found:
            names.add(next(found.group(g) for g in ("n1", "n2", "n3", "n4") if found.group(g)))
    return names


def module_names(keys: Iterable[str]) -> set[str]:
    """Every module path in a state dict (keys minus their parameter name, base_layer folded into its module)."""
    modules = set()
    for key in keys:
        module = key.rsplit(".", 1)[0]
        for wrapped in (".base_layer", ".original_module"):
            if module.endswith(wrapped):
                module = module[: -len(wrapped)]
        if ".lora_" in module or ".modules_to_save." in module:
            continue
        modules.add(module)
    return modules


def find_adapter_config(location: Location, levels: int = 3) -> dict[str, Any] | None:
    """The nearest LoRA ``adapter_config.json`` in SRC (a folder), beside it, or up to ``levels`` folders above.

    It is input like the checkpoint: the listing says whether it is there, and it is read only as a regular file
    of at most ``MAX_ADAPTER_CONFIG_BYTES`` (a FIFO or a link in its place never hangs the search or is followed)
    and checked field by field. One that is there but unreadable in any of these ways is an IntegrityError naming
    it, never skipped: the adapter would silently take other settings than its training's.
    """
    try:
        is_dir = location.stat().type == "directory"
    except NotFoundError:
        is_dir = False
    here = location if is_dir else location.parent()
    for _ in range(levels + 1):
        try:
            entry = here.stat(ADAPTER_CONFIG)
        except (NotFoundError, PermissionDeniedError):
            entry = None
        if entry is not None and entry.type != "directory":
            config = read_adapter_config(here)
            if config.get("peft_type", "LORA") == "LORA":
                check_adapter_config(config, here.url_of(ADAPTER_CONFIG))
                return config
        # Never above the bucket on an object store (its root "folder" is the bucket itself).
        if here.at_top:
            break
        here = here.parent()
    return None


def plan_adapter(
    src: Location,
    *,
    adapter_name: str | None = None,
    overrides: dict[str, Any] | None = None,
    config_from: dict[str, Any] | None = None,
) -> AdapterPlan:
    """Map a state dict's LoRA tensors to adapter keys and build the config (no tensor data read)."""
    tensors, described = open_state_dict(src)
    by_key = {strip_wrappers(k): v for k, v in tensors.items()}
    names = adapter_names(by_key)
    if not names:
        raise NotFoundError(
            f"{described} holds no LoRA tensors (no lora_A/lora_B/lora_embedding/modules_to_save keys)",
            url=src.url,
            hint="for a fine-tuned model without LoRA layers, use --base BASE --tuned TUNED (SVD)",
        )
    if adapter_name is None:
        if "default" in names or len(names) == 1:
            adapter_name = "default" if "default" in names else next(iter(names))
        else:
            raise UsageError(
                f"{described} holds several adapters ({', '.join(sorted(names))}); pick one with --adapter-name"
            )
    elif adapter_name not in names:
        raise UsageError(
            f"no adapter named {adapter_name!r} in {described}; it holds: {', '.join(sorted(names))}"
        )
    template = config_from if config_from is not None else find_adapter_config(src)
    settings = dict(UNKNOWABLE_DEFAULTS)
    settings["lora_alpha"] = None
    if template:
        settings["_template"] = template
        for key in (*UNKNOWABLE_DEFAULTS, "lora_alpha"):
            if key in template:
                settings[key] = template[key]
    for key, value in (overrides or {}).items():
        if value is not None:
            settings[key] = value
    if settings["lora_alpha"] is None:
        raise UsageError(
            "lora_alpha is not in the checkpoint and no adapter_config.json was found beside or above SRC",
            hint="pass --alpha (the lora_alpha used in training); a guessed alpha silently changes the outputs",
        )

    out: dict[str, TensorSource] = {}
    ranks: dict[str, int] = {}
    targeted: set[str] = set()
    dora = lora_bias = False
    saved_modules: set[str] = set()
    for key, tensor in by_key.items():
        found = _LORA.match(key)
        if not found:
            continue
        module = found.group("module")
        if found.group("ab") and found.group("n1") == adapter_name:
            out[f"{module}.{found.group('ab')}.{found.group('param')}"] = tensor
            targeted.add(module)
            if found.group("ab") == "lora_A" and found.group("param") == "weight":
                ranks[module] = tensor.shape[0]
            if found.group("param") == "bias":
                lora_bias = True
        elif found.group("emb") and found.group("n2") == adapter_name:
            out[f"{module}.{found.group('emb')}"] = tensor
            targeted.add(module)
            if found.group("emb") == "lora_embedding_A":
                ranks[module] = tensor.shape[0]
        elif found.group("n3") == adapter_name:
            out[f"{module}.lora_magnitude_vector"] = tensor
            dora = True
        elif found.group("n4") == adapter_name:
            out[f"{module}.{found.group('mparam')}"] = tensor
            saved_modules.add(module)
    if not targeted and not saved_modules:
        raise NotFoundError(f"adapter {adapter_name!r} of {described} has no tensors", url=src.url)
    # Biases PEFT saves with the adapter: bias="lora_only" -> the targeted modules' base biases (trained);
    # bias="all" -> every bias. The embedding base weight comes along when an embedding is targeted.
    bias_mode = settings["bias"]
    for key, tensor in by_key.items():
        if _LORA.match(key):
            continue
        module, _, param = key.rpartition(".")
        owner = module[: -len(".base_layer")] if module.endswith(".base_layer") else None
        saved_bias = param == "bias" and (
            bias_mode == "all" or (bias_mode == "lora_only" and owner in targeted)
        )
        embedding_base = param == "weight" and owner in targeted and f"{owner}.lora_embedding_A" in out
        if saved_bias or embedding_base:
            out[key] = tensor
    config = _config(
        by_key, settings, ranks, targeted, saved_modules, dora, lora_bias, tensors=by_key, adapter=out
    )
    return AdapterPlan(out, config, adapter_name, described)


def target_modules_for(targeted: set[str], modules: set[str]) -> list[str]:
    """PEFT ``target_modules`` naming exactly the modules that carry LoRA: a leaf name (``q_proj``) when every
    module of that name does, else their full paths (as with ``layers_to_transform``)."""
    names: list[str] = []
    for leaf in sorted({m.rsplit(".", 1)[-1] for m in targeted}):
        same_leaf = {m for m in modules | targeted if m.rsplit(".", 1)[-1] == leaf}
        if same_leaf <= targeted:
            names.append(leaf)
        else:
            names += sorted(_short(m) for m in targeted if m.rsplit(".", 1)[-1] == leaf)
    return names


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    r"""PEFT's rank_pattern/alpha_pattern lookup: keys are regexes matched as ``(.*\.)?(key)$``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets(spelled: list[str] | str, module: str) -> bool:
    """Whether PEFT's ``target_modules`` (a regex string, or names matched as suffixes) selects ``module``."""
    if isinstance(spelled, str):
        return re.fullmatch(spelled, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in spelled)


def _short(module: str) -> str:
    return module[len(PREFIX) :] if module.startswith(PREFIX) else module


def _config(
    keys: Iterable[str],
    settings: dict[str, Any],
    ranks: dict[str, int],
    targeted: set[str],
    saved_modules: set[str],
    dora: bool,
    lora_bias: bool,
    *,
    tensors: dict[str, TensorSource],
    adapter: dict[str, TensorSource],
) -> dict[str, Any]:
    modules = module_names(keys)
    counts = Counter(ranks.values())
    r = max(counts, key=lambda v: (counts[v], v)) if counts else 8
    rank_pattern: dict[str, int] = {re.escape(_short(m)): k for m, k in sorted(ranks.items()) if k != r}
    target_modules: list[str] | str = target_modules_for(targeted, modules)
    saved: list[str] | None = sorted({_short(m).rsplit(".", 1)[-1] for m in saved_modules}) or None
    template = settings.get("_template") or {}
    # A config found beside SRC keeps its own spelling (rank_pattern keys, target_modules, modules_to_save) when
    # it says what the weights show; where it disagrees, the weights win.
    if isinstance(template.get("r"), int) and all(
        _pattern_value(template.get("rank_pattern") or {}, _short(m), template["r"]) == k
        for m, k in ranks.items()
    ):
        r, rank_pattern = template["r"], dict(template.get("rank_pattern") or {})
    spelled = template.get("target_modules")
    if spelled and {_short(m) for m in modules | targeted if _targets(spelled, _short(m))} == {
        _short(m) for m in targeted
    }:
        target_modules = spelled
    if (
        template.get("modules_to_save")
        and saved_modules
        and all(any(_short(m).endswith(t) for t in template["modules_to_save"]) for m in saved_modules)
    ):
        saved = list(template["modules_to_save"])
    fan_in_fan_out = False
    for module in targeted:
        base = tensors.get(f"{module}.base_layer.weight")
        a, b = adapter.get(f"{module}.lora_A.weight"), adapter.get(f"{module}.lora_B.weight")
        if base is None or a is None or b is None or len(base.shape) != 2:
            continue
        # A Conv1D (GPT-2) stores its weight as (in, out): LoRA then needs fan_in_fan_out.
        if base.shape == (a.shape[1], b.shape[0]) != (b.shape[0], a.shape[1]):
            fan_in_fan_out = True
    alpha = settings["lora_alpha"]
    alpha_pattern = dict(settings.get("alpha_pattern") or {})
    return {
        "peft_type": "LORA",
        "task_type": settings["task_type"],
        "base_model_name_or_path": settings["base_model_name_or_path"],
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": settings["lora_dropout"],
        "use_rslora": bool(settings["use_rslora"]),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": target_modules,
        "modules_to_save": saved,
        "use_dora": dora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": settings["bias"],
        "lora_bias": lora_bias,
        "inference_mode": True,
        "init_lora_weights": True,
    }


@dataclass
class WriteResult:
    out_dir: str
    tensors: int
    bytes: int
    seconds: float
    config: dict[str, Any]


def checked_out_dir(out_dir: str, *, force: bool, inputs: dict[str, Location] | None = None) -> str:
    """OUT_DIR as an absolute local path, checked before any work so a long extraction never fails at the end.

    ``inputs`` (role -> location, e.g. ``{"SRC": src}``): an OUT_DIR that is, contains or lies inside one of them
    is refused, so that ``--force`` never deletes, and the write never replaces, what is being read.
    """
    if is_url(out_dir):
        raise UsageError(
            f"OUT_DIR must be a local folder, not {out_dir}; write the adapter locally, then copy it to the store"
        )
    for role, source in (inputs or {}).items():
        refuse_overlap(Location.from_url(out_dir), source, output_role="OUT_DIR", source_role=role)
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not force:
        raise RefusedError(f"{out_dir} exists; pass --force to replace it")
    return out_dir


def write_adapter(
    tensors: dict[str, TensorSource] | dict[str, Any],
    config: dict[str, Any],
    out_dir: str,
    *,
    force: bool = False,
    chunks_of: Callable[[Any], Iterator[bytes]] | None = None,
    dtype_of: Callable[[Any], str] | None = None,
    shape_of: Callable[[Any], tuple[int, ...]] | None = None,
) -> WriteResult:
    """Write OUT_DIR atomically: a partial folder beside it (``storage.atomic``: never through a link), filled,
    then renamed into place; on failure (a full disk included) it is removed and OUT_DIR is as it was."""
    started = time.perf_counter()
    out_dir = checked_out_dir(out_dir, force=force)
    get_chunks = chunks_of or (lambda t: t.stream())
    get_dtype = dtype_of or (lambda t: t.dtype)
    get_shape = shape_of or (lambda t: t.shape)
    planned = safetensors_order(PlannedTensor(k, get_dtype(v), get_shape(v)) for k, v in tensors.items())
    temp = partial_folder(out_dir)
    written = 0
    prepared = False
    try:
        prepare_partial_folder(temp, resume=False)
        prepared = True
        with durable_new_file(os.path.join(temp, "adapter_model.safetensors")) as handle:
            stream = SafetensorsStream(handle, planned, {"format": "pt"})
            for item in planned:
                written += stream.write(item.name, get_chunks(tensors[item.name]))
            stream.close()
        with durable_new_file(os.path.join(temp, "adapter_config.json")) as handle:
            handle.write(json.dumps(config, indent=2, sort_keys=True).encode())
        commit_folder(temp, out_dir, replace=force)
    except BaseException as exc:
        if prepared:
            shutil.rmtree(temp, ignore_errors=True)
        mapped = disk_error(exc, out_dir) if isinstance(exc, OSError) else None
        if mapped is not None:
            raise mapped from exc
        raise
    return WriteResult(out_dir, len(planned), written, time.perf_counter() - started, config)


def extract_from_checkpoint(
    src: Location,
    out_dir: str,
    *,
    adapter_name: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> WriteResult:
    """Mode 1: the exact adapter out of a checkpoint holding LoRA tensors."""
    checked_out_dir(out_dir, force=force, inputs={"SRC": src})
    plan = plan_adapter(src, adapter_name=adapter_name, overrides=overrides)
    return write_adapter(plan.tensors, plan.config, out_dir, force=force)
