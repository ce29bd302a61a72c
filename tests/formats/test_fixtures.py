"""Every checkpoint in shared/fixtures reads as its own reference says: names, dtypes, shapes, aliases,
parameter totals, ZeRO stage and world size. The references were written by DeepSpeed, torch and PEFT, not by
ckptctl, so these tests compare against independent ground truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from ckptctl.formats.model import Inspection
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_zip import read_torch_archive
from ckptctl.inspect import inspect_checkpoint
from ckptctl.storage.location import Location

# case -> (stage, data-parallel world size, parameters, trainable parameters); README of each case.
ZERO_CASES = {
    "z1-fp32-tied-frozen": (1, 2, 985, 803),
    "z2-bf16-tied-frozen": (2, 2, 985, 803),
    "z2-bf16-untied": (2, 2, 1429, 1429),
    "z3-bf16-tied-frozen": (3, 2, 985, 803),
    "z3-fp32-ws3": (3, 3, 985, 803),
}


def _reference(path: Path) -> list[dict[str, Any]]:
    return json.loads((path / "tensors.json").read_text())["tensors"]


def _rows(inspection: Inspection, roles: set[str] | None = None) -> list[tuple[Any, ...]]:
    return [
        (t.name, t.dtype, list(t.shape), t.alias_of)
        for t in inspection.tensors
        if roles is None or t.role in roles
    ]


@pytest.mark.parametrize("case", sorted(ZERO_CASES))
def test_zero_checkpoint_matches_deepspeed_reference(shared_fixtures: Path, case: str) -> None:
    root = shared_fixtures / "zero" / case
    result = inspect_checkpoint(str(root / "checkpoint"), verify=True)
    stage, world, params, trainable = ZERO_CASES[case]
    zero = result.facts["zero"]
    assert (result.format, zero["stage"], zero["dp_world_size"], zero["mp_world_size"]) == (
        "deepspeed",
        stage,
        world,
        1,
    )
    assert zero["tag"] == zero["latest"] == "global_step3" and zero["ds_version"] == "0.19.8"
    assert (result.totals()["parameters"], result.totals()["trainable_parameters"]) == (params, trainable)
    assert result.complete and result.verified

    # Names, order, shapes and aliases equal DeepSpeed's own zero_to_fp32 output; stage 1 saves no frozen
    # shapes, so DeepSpeed drops those params (we still list them, flagged).
    only_in_module = set(zero["frozen_params_in_module_only"])
    assert bool(only_in_module) == (stage == 1)
    ours = [(n, s, a) for n, _, s, a in _rows(result) if n not in only_in_module]
    reference = _reference(root / "reference")
    assert ours == [(t["name"], t["shape"], t.get("alias_of")) for t in reference]
    # The converter casts every float to its output dtype: buffers keep the dtype they were saved in (fp32
    # reference), parameters are in the training dtype (the bf16 reference when training in bf16).
    params_ref = root / ("reference-bf16" if zero["training_dtype"] == "bfloat16" else "reference")
    expected_dtypes = {t["name"]: t["dtype"] for t in _reference(params_ref)}
    expected_dtypes.update(
        {t["name"]: t["dtype"] for t in reference if t["name"] in {"pos_scale", "counter"}}
    )
    assert {n: d for n, d, _, _ in _rows(result) if n not in only_in_module} == expected_dtypes
    excluded = root / "reference-exclude-frozen"
    if excluded.is_dir():
        without_frozen = [(n, s) for n, _, s, _ in _rows(result, {"param", "buffer"})]
        assert without_frozen == [(t["name"], t["shape"]) for t in _reference(excluded)]


def test_zero_torch_files_match_their_manifests(shared_fixtures: Path) -> None:
    """DeepSpeed's converter outputs (torch pickles) list exactly the tensors their manifests hold."""
    manifests = sorted((shared_fixtures / "zero").glob("*/reference*/tensors.json"))
    assert len(manifests) >= 10
    for manifest in manifests:
        result = inspect_checkpoint(str(manifest.parent / "pytorch_model.bin"))
        expected = [
            (t["name"], t["dtype"], t["shape"], t.get("alias_of")) for t in _reference(manifest.parent)
        ]
        assert _rows(result) == expected, manifest


def test_torch_byte_offsets_locate_the_tensor_bytes(shared_fixtures: Path) -> None:
    """The per-tensor byte offsets (for streaming readers such as consolidate) point at the exact bytes whose
    sha256 DeepSpeed's manifest records."""
    folder = shared_fixtures / "zero" / "z3-fp32-ws3" / "reference"
    path = folder / "pytorch_model.bin"
    archive = read_torch_archive(FileSource(Location.from_url(str(folder)), path.name, path.stat().st_size))
    digests = {t["name"]: t["sha256"] for t in _reference(folder)}
    raw = path.read_bytes()
    for record in archive.tensors:
        start = archive.tensor_byte_offset(record)
        data = raw[start : start + record.numel * record.itemsize]
        assert hashlib.sha256(data).hexdigest() == digests[record.name], record.name


@pytest.mark.parametrize("case", ["dtensor-tp-shard01", "torchtitan-fsdp2"])
def test_dcp_checkpoint_matches_torch_reference(shared_fixtures: Path, case: str) -> None:
    root = shared_fixtures / "dcp" / case
    checkpoint = next(p.parent for p in (root / "checkpoint").rglob(".metadata"))
    reference = json.loads((root / "reference" / "tensors.json").read_text())["tensors"]
    expected = {name: (t["dtype"], t["shape"]) for name, t in reference.items()}
    result = inspect_checkpoint(str(checkpoint), verify=True)
    assert result.format == "dcp" and result.complete
    assert {t.name: (t.dtype, list(t.shape)) for t in result.tensors} == expected
    model = [n for n in expected if not n.startswith(("optimizer.", "lr_scheduler.", "train_state."))]
    assert result.parameters == sum(_numel(expected[n][1]) for n in model)
    assert result.facts["dcp"]["files_referenced"] == ["__0_0.distcp", "__1_0.distcp"]
    # torch's converter output and the live gathered tensors read the same, through two other readers.
    consolidated = inspect_checkpoint(str(root / "reference" / "consolidated.pt"))
    assert {t.name: (t.dtype, list(t.shape)) for t in consolidated.tensors} == expected
    live = inspect_checkpoint(str(root / "reference" / "live_full.safetensors"))
    assert {t.name: (t.dtype, list(t.shape)) for t in live.tensors} == expected


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def test_dcp_chunks_of_uneven_and_empty_shards(shared_fixtures: Path) -> None:
    step = shared_fixtures / "dcp" / "torchtitan-fsdp2" / "checkpoint" / "step-3"
    result = inspect_checkpoint(str(step))
    assert result.facts["dcp"]["bytes_items"] == 259 and result.facts["dcp"]["tensors"] == 87
    assert {t.name: t.shape for t in result.tensors}["sink"] == (1, 16)


def test_peft_adapter_facts(shared_fixtures: Path) -> None:
    case = shared_fixtures / "lora" / "lora_basic"
    meta = json.loads((case / "meta.json").read_text())
    result = inspect_checkpoint(str(case / "adapter"))
    peft = result.facts["peft"]
    config = meta["lora_config_kwargs"]
    assert (peft["r"], peft["lora_alpha"], peft["scaling"]) == (config["r"], config["lora_alpha"], 2.0)
    assert set(peft["target_modules"]) == set(config["target_modules"])
    assert peft["adapted_modules"] == 14 and result.complete
    # Adapter size: every trainable LoRA tensor of the training run, with the adapter name removed.
    trainable = {n.replace(".default", "") for n in meta["trainable_parameters"]}
    assert {t.name for t in result.tensors} == trainable
    assert result.totals()["tensor_bytes"] == 4 * result.parameters


def test_lora_state_dicts_agree_across_formats_and_wrappers(shared_fixtures: Path) -> None:
    """The same state dict saved as safetensors, torch, DDP, torch.compile and DeepSpeed ZeRO-2/3 lists the
    same tensors (the safetensors file, written by the safetensors library, is the reference)."""
    case = shared_fixtures / "lora" / "lora_basic"
    meta = json.loads((case / "meta.json").read_text())
    # safetensors orders its header by data layout, torch by insertion: compare as sorted lists.
    expected = sorted(_rows(inspect_checkpoint(str(case / "full_state_dict.safetensors"))))
    assert len(expected) == 49
    assert sorted(_rows(inspect_checkpoint(str(case / "full_state_dict.pt")))) == expected
    for wrapper, prefix in (("ddp", "module."), ("compiled", "_orig_mod.")):
        rows = _rows(inspect_checkpoint(str(case / f"full_state_dict_{wrapper}.pt")))
        assert sorted((n.removeprefix(prefix), *rest) for n, *rest in rows) == expected
    for stage in (2, 3):
        result = inspect_checkpoint(str(case / f"deepspeed_zero{stage}"))
        assert result.facts["zero"]["stage"] == stage and result.facts["zero"]["dp_world_size"] == 1
        assert sorted(_rows(result)) == expected
        assert [t.name for t in result.tensors if t.role == "param"] == meta["trainable_parameters"]
    base = inspect_checkpoint(str(shared_fixtures / "lora" / "bases" / "llama"))
    merged = inspect_checkpoint(str(case / "merged"))
    assert base.format == merged.format == "safetensors" and _rows(base) == _rows(merged)
    assert base.metadata == {"format": "pt"}
