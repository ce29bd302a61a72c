"""consolidate on the DeepSpeed saves zero_to_fp32 does not cover: ZeRO-1 / BF16_Optimizer frozen parameters, a
universal checkpoint (ds_to_universal), Lightning's DeepSpeed ``*.ckpt/`` folder (2.6.6 names, and the
``_forward_module.`` names of Lightning < 2.1). Each is bit-identical to its reference with torch not importable;
bad inputs give one line, the exit code, and nothing under OUT. Fixtures: tests/fixtures/deepspeed/gen.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli.test_without_torch import run_without_torch
from tests.conftest import run_cli
from tests.convert.test_consolidate import read_output
from tests.convert.test_consolidate_dcp import _convert_fails

OURS = Path(__file__).resolve().parents[1] / "fixtures" / "deepspeed"
LIGHTNING_FOLDER = "epoch=0-step=3.ckpt"
# case -> (SRC inside the case folder, format in the report)
CASES = {
    "z1-bf16-frozen": ("checkpoint", "zero"),
    "bf16opt-frozen": ("checkpoint", "zero"),
    "universal-z2": ("checkpoint", "universal"),
    "lightning-z2": (f"checkpoint/{LIGHTNING_FOLDER}", "zero"),
    "lightning-z2-forward-module": (f"checkpoint/{LIGHTNING_FOLDER}", "zero"),
}
SHORT = {"float32": "F32", "bfloat16": "BF16", "int64": "I64", "float16": "F16"}


def reference(case: str) -> tuple[dict[str, tuple[str, list[int], str]], dict[str, str]]:
    tensors = json.loads((OURS / case / "reference" / "tensors.json").read_text())["tensors"]
    written = {
        t["name"]: (SHORT[t["dtype"]], t["shape"], t["sha256"]) for t in tensors if not t.get("alias_of")
    }
    return written, {t["name"]: t["alias_of"] for t in tensors if t.get("alias_of")}


def written(path: Path) -> tuple[dict[str, tuple[str, list[int], str]], dict[str, str]]:
    metadata, tensors = read_output(path)
    return {n: (d, s, h) for n, d, s, h in tensors}, json.loads(metadata.get("tied_aliases", "{}"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_identical_to_the_reference_without_torch(case: str, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    src, kind = CASES[case]
    body, loaded, code = run_without_torch("consolidate", str(OURS / case / src), str(out), "--json")
    assert code in ("0", "None") and not loaded, body
    assert written(out) == reference(case)
    data = json.loads(body)["data"]
    assert data["format"] == kind and data["kept"] == len(reference(case)[0])


def test_zero1_frozen_parameters_come_first_after_the_buffers_and_are_reported(tmp_path: Path) -> None:
    """zero_to_fp32's order (buffers, frozen, trainable, aliases), and the report says where they came from."""
    out = tmp_path / "m.safetensors"
    result = run_cli("consolidate", str(OURS / "bf16opt-frozen" / "checkpoint"), str(out), "--json")
    assert result.returncode == 0, result.stderr
    names = [n for n, *_ in read_output(out)[1]]
    assert names[:4] == ["pos_scale", "counter", "frozen_block.weight", "frozen_block.bias"]
    (warning,) = json.loads(result.stdout)["data"]["warnings"]
    assert "2 (frozen_block.weight, frozen_block.bias) were written from the module weights" in warning
    excluded = tmp_path / "x.safetensors"
    flags = ("--exclude-frozen", "--json")
    result = run_cli("consolidate", str(OURS / "bf16opt-frozen" / "checkpoint"), str(excluded), *flags)
    assert json.loads(result.stdout)["data"]["warnings"] == []
    assert not any(n.startswith("frozen_block.") for n, *_ in read_output(excluded)[1])


def test_universal_by_tag_from_a_save_dir_that_also_has_latest(tmp_path: Path) -> None:
    """A save dir holding the ZeRO tag's ``latest`` reads the ZeRO tag; ``--tag X_universal`` the universal one."""
    src = tmp_path / "ckpt"
    shutil.copytree(OURS / "universal-z2" / "checkpoint", src)
    (src / "latest").write_text("global_step3")
    out = tmp_path / "m.safetensors"
    result = run_cli("consolidate", str(src), str(out), "--tag", "global_step3_universal", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"]["format"] == "universal"
    assert written(out) == reference("universal-z2")


# -- bad input ---------------------------------------------------------------------------------------------------


def _copy(tmp_path: Path, case: str) -> Path:
    src = tmp_path / "ckpt"
    shutil.copytree(OURS / case / "checkpoint", src)
    return src


def test_universal_missing_parameter_folder_is_named(tmp_path: Path) -> None:
    src = _copy(tmp_path, "universal-z2")
    shutil.rmtree(src / "global_step3_universal" / "zero" / "proj_in.bias")
    _convert_fails(tmp_path, src, 8, "1 parameter folder(s) missing: zero/proj_in.bias/fp32.pt")


def test_universal_left_unfinished_is_refused(tmp_path: Path) -> None:
    src = _copy(tmp_path, "universal-z2")
    (src / "global_step3_universal" / "tmp" / "gate" / "0").mkdir(parents=True)
    (src / "global_step3_universal" / "tmp" / "gate" / "0" / "fp32.00").write_bytes(b"x")
    _convert_fails(tmp_path, src, 8, "this conversion did not complete")


def test_universal_pointer_to_a_missing_folder(tmp_path: Path) -> None:
    src = _copy(tmp_path, "universal-z2")
    (src / "latest_universal").write_text("global_step9_universal")
    _convert_fails(tmp_path, src, 8, "names 'global_step9_universal', which holds no universal checkpoint")


def test_lightning_latest_naming_a_missing_tag(tmp_path: Path) -> None:
    src = _copy(tmp_path, "lightning-z2") / LIGHTNING_FOLDER
    (src / "latest").write_text("checkpoint-old")
    _convert_fails(tmp_path, src, 8, "names tag 'checkpoint-old', which has no model or optimizer states")
