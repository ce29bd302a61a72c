"""``ckptctl extract-lora`` on the sharded saves it reads through ``formats/sources.open_state_dict``: an
Accelerate FSDP2 DCP folder (``pytorch_model_fsdp_0/``), DCP's Hugging Face writer (``sharded/``) and a DeepSpeed
universal checkpoint, all of one trained PEFT model. Each adapter must be byte-identical to PEFT's own
``save_pretrained`` of that model, written with torch not importable; a rank file lost is refused in one line.
Fixtures: tests/fixtures/lora_sources/gen.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.cli.test_without_torch import run_without_torch
from tests.conftest import run_cli

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "lora_sources"
REFERENCE = HERE / "reference"
FLAGS = ("--alpha", "8", "--task-type", "CAUSAL_LM")
# What a full state dict tells or the flags give; base_model_name_or_path is neither here.
COMPARED = (
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
    "use_dora", "fan_in_fan_out", "bias", "lora_bias",
)  # fmt: skip
SOURCES = {
    "accelerate save_state folder": "accelerate-fsdp2/checkpoint",
    "accelerate pytorch_model_fsdp_0": "accelerate-fsdp2/checkpoint/pytorch_model_fsdp_0",
    "dcp-hf step folder": "dcp-hf/step-10",
    "dcp-hf sharded": "dcp-hf/step-10/sharded",
    "universal save dir": "universal-z2/checkpoint",
    "universal folder": "universal-z2/checkpoint/global_step1_universal",
}


def assert_same_adapter(ours: Path) -> None:
    """Every tensor bit for bit, the file byte for byte, the config field by field as PEFT wrote it."""
    mine = load_file(str(ours / "adapter_model.safetensors"))
    theirs = load_file(str(REFERENCE / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    for name, tensor in theirs.items():
        got = mine[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert np.array_equal(got.view(np.uint8), tensor.view(np.uint8)), name
    assert (ours / "adapter_model.safetensors").read_bytes() == (
        REFERENCE / "adapter_model.safetensors"
    ).read_bytes()
    got_config = json.loads((ours / "adapter_config.json").read_text())
    want_config = json.loads((REFERENCE / "adapter_config.json").read_text())
    for field in COMPARED:
        assert got_config[field] == want_config[field], field
    assert set(got_config["target_modules"]) == set(want_config["target_modules"])
    assert not got_config["modules_to_save"] and not want_config["modules_to_save"]


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_adapter_is_peft_s_own_without_torch(source: str, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    body, loaded, code = run_without_torch(
        "extract-lora", str(HERE / SOURCES[source]), str(out), *FLAGS, "--json"
    )
    assert code in ("0", "None") and not loaded, body
    assert json.loads(body)["data"]["tensors"] == 8
    assert_same_adapter(out)


@pytest.mark.parametrize(
    ("case", "remove", "text"),
    [
        (
            "accelerate-fsdp2",
            "checkpoint/pytorch_model_fsdp_0/__1_0.distcp",
            "__1_0.distcp: data file referenced",
        ),
        (
            "dcp-hf",
            "step-10/sharded/shard-00002-model-00001-of-00002.safetensors",
            "shard-00002-model-00001-of-00002.safetensors is missing: rank 2 wrote",
        ),
    ],
)
def test_a_rank_file_lost_is_one_line(case: str, remove: str, text: str, tmp_path: Path) -> None:
    src = tmp_path / case
    shutil.copytree(HERE / case, src)
    (src / remove).unlink()
    out = tmp_path / "adapter"
    result = run_cli("extract-lora", str(src / remove.split("/")[0]), str(out), *FLAGS)
    assert result.returncode == 8, result.stderr
    assert "Traceback" not in result.stderr and text in result.stderr.splitlines()[0]
    assert not out.exists()
