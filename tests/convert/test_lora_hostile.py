"""``extract-lora`` on hostile input (issue 15): an alpha that is not a number, an ``adapter_config.json`` that
is not a regular file or holds a field of the wrong kind, a source whose own header proves it damaged. Each is
one error line with its exit code, and nothing is written. Real files in tmp_path, the real CLI.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ckptctl.convert.lora import extract_from_checkpoint
from ckptctl.errors import IntegrityError
from ckptctl.storage import Location
from tests.conftest import run_cli
from tests.hostile import mutations as m

SFT = "full_state_dict.safetensors"


@pytest.fixture
def src(shared_fixtures: Path, tmp_path: Path) -> Path:
    """A checkpoint folder holding the fixture's LoRA state dict and its adapter_config.json."""
    case = shared_fixtures / "lora" / "lora_basic"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(case / SFT, folder)
    shutil.copy(case / "adapter" / "adapter_config.json", folder)
    return folder


def assert_refused(result: Any, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2 and "Traceback" not in result.stderr, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def written(tmp_path: Path) -> list[str]:
    """Anything an extraction left beside its OUT_DIR (the adapter, or a partial folder)."""
    return [p for p in os.listdir(tmp_path) if p not in ("ckpt", "outside")]


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "0", "-4"])
def test_an_alpha_that_is_not_a_positive_finite_number_is_a_usage_error(
    alpha: str, src: Path, tmp_path: Path
) -> None:
    result = run_cli("extract-lora", str(src / SFT), str(tmp_path / "out"), f"--alpha={alpha}")
    assert_refused(result, 2, "--alpha")
    assert not written(tmp_path)


def test_a_valid_alpha_still_writes_it(src: Path, tmp_path: Path) -> None:
    (src / "adapter_config.json").unlink()
    result = run_cli("extract-lora", str(src / SFT), str(tmp_path / "out"), "--alpha", "8.5")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"] == 8.5


BAD_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "rank-pattern-bad-regex": ({"rank_pattern": {"(": 4}}, "rank_pattern"),
    "rank-pattern-a-list": ({"rank_pattern": [1, 2]}, "rank_pattern"),
    "rank-pattern-rank-a-string": ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern"),
    "alpha-pattern-bad-regex": ({"alpha_pattern": {"[": 4}}, "alpha_pattern"),
    "target-modules-a-number": ({"target_modules": 5}, "target_modules"),
    "target-modules-bad-regex": ({"target_modules": "(q|"}, "target_modules"),
    "target-modules-not-names": ({"target_modules": ["q_proj", 3]}, "target_modules"),
    "modules-to-save-a-number": ({"modules_to_save": 3}, "modules_to_save"),
    "lora-alpha-nan": ({"lora_alpha": math.nan}, "lora_alpha"),
    "lora-alpha-a-string": ({"lora_alpha": "16"}, "lora_alpha"),
    "r-a-string": ({"r": "8"}, "r is"),
    "bias-unknown": ({"bias": "some"}, "bias"),
    "use-rslora-a-string": ({"use_rslora": "yes"}, "use_rslora"),
    "lora-dropout-over-one": ({"lora_dropout": 5}, "lora_dropout"),
    "task-type-an-object": ({"task_type": {"x": 1}}, "task_type"),
    # Shapes whose matching time explodes on a near-miss module name: refused before any name is matched.
    "rank-pattern-nested-repeat": ({"rank_pattern": {"(q+)+_proj": 4}}, "exponential time"),
    "alpha-pattern-alternation-repeat": ({"alpha_pattern": {"(a|ab)*z": 4}}, "exponential time"),
    "target-modules-nested-repeat": ({"target_modules": "(.*a){20}x"}, "exponential time"),
    "rank-pattern-backreference": ({"rank_pattern": {"(q)\\1": 4}}, "backreference"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_an_adapter_config_field_of_the_wrong_kind_is_refused_naming_file_and_field(
    case: str, src: Path, tmp_path: Path
) -> None:
    fields, field = BAD_FIELDS[case]
    path = src / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    with pytest.raises(IntegrityError) as caught:
        extract_from_checkpoint(Location.from_url(str(src / SFT)), str(tmp_path / "out"), overrides={})
    assert str(path) in caught.value.message and field in caught.value.message, caught.value.message
    assert not written(tmp_path)


def test_the_cli_says_which_file_and_field(src: Path, tmp_path: Path) -> None:
    path = src / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rank_pattern": {"(": 4}}))
    result = run_cli("extract-lora", str(src / SFT), str(tmp_path / "out"), "--alpha", "8")
    assert_refused(result, 8, str(path), "rank_pattern")
    assert not written(tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "sparse-2gib"])
def test_an_adapter_config_that_is_not_a_small_regular_file_is_never_read(
    kind: str, src: Path, tmp_path: Path
) -> None:
    path = src / "adapter_config.json"
    if kind == "fifo":
        m.fifo(path)  # a plain open() blocks forever on it
    elif kind == "symlink":
        outside = tmp_path / "outside"
        outside.mkdir()
        shutil.copy(path, outside / "adapter_config.json")
        m.symlink(path, outside / "adapter_config.json")
    else:
        m.sparse(path)
    result = run_cli("extract-lora", str(src / SFT), str(tmp_path / "out"), "--alpha", "8", timeout=30)
    assert_refused(result, 8, "adapter_config.json")
    assert not written(tmp_path)


def test_a_folder_named_adapter_config_is_not_a_config(src: Path, tmp_path: Path) -> None:
    path = src / "adapter_config.json"
    path.unlink()
    path.mkdir()
    result = run_cli("extract-lora", str(src / SFT), str(tmp_path / "out"), "--alpha", "8")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: m.truncate_at(p, -1),  # the last byte of the last tensor, outside the adapter's tensors
        lambda p: m.safetensors_offsets(p, lambda o, n: [o[0], n + 4096]),  # a span past the end
    ],
    ids=["truncated-last-byte", "offsets-past-eof"],
)
def test_a_source_whose_header_proves_it_damaged_is_refused_before_writing(
    damage: Any, src: Path, tmp_path: Path
) -> None:
    damage(src / SFT)
    with pytest.raises(IntegrityError) as caught:
        extract_from_checkpoint(Location.from_url(str(src / SFT)), str(tmp_path / "out"), overrides={})
    assert str(src / SFT) in caught.value.message
    result = run_cli("extract-lora", str(src / SFT), str(tmp_path / "out"), "--alpha", "8")
    assert_refused(result, 8, SFT)
    assert not written(tmp_path)
