"""consolidate on torch state dicts: a Lightning .ckpt, a plain torch.save .pt (nested dicts joined with "."), and
HF-sharded pytorch_model-*.bin + index; each compared with torch.load(weights_only=True) of the same file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.convert.test_consolidate import assert_one_line, read_output

torch = pytest.importorskip("torch")
TRAINERS = Path(__file__).resolve().parents[1] / "fixtures" / "trainers"
LIGHTNING = TRAINERS / "lightning" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
SHORT = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bool: "BOOL",
}


def digest(tensors: dict[str, Any]) -> dict[str, tuple[str, list[int], str]]:
    out = {}
    for name, tensor in tensors.items():
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        out[name] = (SHORT[tensor.dtype], list(tensor.shape), hashlib.sha256(data).hexdigest())
    return out


def convert(
    tmp_path: Path, src: Path, *flags: str
) -> tuple[dict[str, tuple[str, list[int], str]], dict, dict]:
    out = tmp_path / "m.safetensors"
    result = run_cli("consolidate", str(src), str(out), "--json", "--force", *flags)
    assert result.returncode == 0, result.stderr
    metadata, tensors = read_output(out)
    return {n: (d, s, h) for n, d, s, h in tensors}, json.loads(result.stdout)["data"], metadata


def test_lightning_ckpt_writes_its_state_dict(tmp_path: Path) -> None:
    ours, data, _ = convert(tmp_path, LIGHTNING)
    expected = digest(torch.load(LIGHTNING, weights_only=True)["state_dict"])
    assert ours == expected and data["format"] == "torch" and data["dropped"] > 0


def test_plain_torch_save_with_a_model_wrapper(tmp_path: Path) -> None:
    """The torch tutorial's {"model_state_dict", "optimizer_state_dict", "step"}: the model sub-tree, unwrapped."""
    src = TRAINERS / "torch-zip" / "step_10.pt"
    ours, _, _ = convert(tmp_path, src)
    assert ours == digest(torch.load(src, weights_only=True)["model_state_dict"])


def test_nested_dicts_are_flattened_and_ties_recorded(tmp_path: Path) -> None:
    weight = torch.randn(3, 4)
    state = {
        "enc": {"w": weight, "b": torch.zeros(4, dtype=torch.bfloat16)},
        "dec": {"w": weight},
        "n": torch.arange(3),
    }
    torch.save(state, tmp_path / "state.pt")
    ours, data, metadata = convert(tmp_path, tmp_path / "state.pt")
    assert ours == digest({"enc.w": weight, "enc.b": state["enc"]["b"], "n": state["n"]})
    assert json.loads(metadata["tied_aliases"]) == {"dec.w": "enc.w"} and data["aliases"] == {
        "dec.w": "enc.w"
    }
    copies, _, _ = convert(tmp_path, tmp_path / "state.pt", "--keep-tied", "--prefix", "dec")
    assert copies == digest({"w": weight})


def _hf_bin(folder: Path) -> dict[str, Any]:
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    shards = [
        {
            "model.embed.weight": torch.randn(5, 4, generator=g),
            "model.layers.0.w": torch.randn(4, 4, generator=g),
        },
        {
            "model.layers.1.w": torch.randn(4, 4, generator=g),
            "lm_head.weight": torch.randn(5, 4, generator=g),
        },
    ]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    return {k: v for shard in shards for k, v in shard.items()}


def test_hf_sharded_bin(tmp_path: Path) -> None:
    """HF names keep their own "model." root: it is the model's sub-module, not a wrapper."""
    tensors = _hf_bin(tmp_path / "hf")
    ours, _, _ = convert(tmp_path, tmp_path / "hf")
    assert ours == digest(tensors) and (tmp_path / "config.json").exists()
    head, _, _ = convert(tmp_path, tmp_path / "hf", "--prefix", "lm_head")
    assert head == digest({"weight": tensors["lm_head.weight"]})


def test_hf_sharded_bin_with_a_missing_shard_or_tensor(tmp_path: Path) -> None:
    _hf_bin(tmp_path / "hf")
    out = tmp_path / "out" / "m.safetensors"
    (tmp_path / "hf" / "pytorch_model-00002-of-00002.bin").rename(tmp_path / "moved.bin")
    assert_one_line(
        run_cli("consolidate", str(tmp_path / "hf"), str(out)),
        3,
        "names pytorch_model-00002-of-00002.bin, which is missing",
    )
    torch.save({"model.layers.1.w": torch.zeros(1)}, tmp_path / "hf" / "pytorch_model-00002-of-00002.bin")
    assert_one_line(
        run_cli("consolidate", str(tmp_path / "hf"), str(out)),
        8,
        "tensor 'lm_head.weight' is not in pytorch_model-00002-of-00002.bin",
    )
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text("{not json")
    assert_one_line(run_cli("consolidate", str(tmp_path / "hf"), str(out)), 8, "not a shard index")
    assert not out.parent.exists()


def test_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.bin").write_bytes(b"hello, this is not a checkpoint at all")
    result = run_cli("consolidate", str(tmp_path / "notes.bin"), str(tmp_path / "o" / "m.safetensors"))
    assert (
        result.returncode == 8 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 2
    )
    assert not (tmp_path / "o").exists()


def test_hf_safetensors_folder_is_rewritten_and_cast(tmp_path: Path) -> None:
    src = TRAINERS / "hf-trainer" / "checkpoint-50"
    ours, _, _ = convert(tmp_path, src)
    _, theirs = read_output(src / "model.safetensors")
    assert ours == {n: (d, s, h) for n, d, s, h in theirs}
    cast, _, _ = convert(tmp_path, src, "--dtype", "bf16")
    assert {d for d, _, _ in cast.values()} == {"BF16"}
