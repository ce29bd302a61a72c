"""--prefix / --exclude / --keep-prefix: sub-trees by whole dotted components, on a composite (policy + value head)
DCP checkpoint and on ZeRO saves; each part comes out exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptctl.convert.selection import Selection
from ckptctl.errors import UsageError
from tests.conftest import SHARED_FIXTURES, run_cli
from tests.convert.test_consolidate import assert_one_line, read_output

COMPOSITE = Path(__file__).resolve().parents[1] / "fixtures" / "dcp" / "no-collectives"
ZERO = SHARED_FIXTURES / "zero"


def live() -> dict[str, tuple[str, list[int], str]]:
    _, tensors = read_output(COMPOSITE / "reference" / "live_full.safetensors")
    return {name: (dtype, shape, digest) for name, dtype, shape, digest in tensors}


def convert(tmp_path: Path, src: Path, *flags: str) -> tuple[dict[str, tuple[str, list[int], str]], dict]:
    out = tmp_path / "m.safetensors"
    result = run_cli("consolidate", str(src), str(out), "--json", "--force", *flags)
    assert result.returncode == 0, result.stderr
    tensors = {name: (dtype, shape, digest) for name, dtype, shape, digest in read_output(out)[1]}
    return tensors, json.loads(result.stdout)["data"]


def part(tensors: dict, prefix: str, *, strip: bool = True) -> dict:
    return {
        (name[len(prefix) + 1 :] if strip else name): value
        for name, value in tensors.items()
        if name.startswith(prefix + ".")
    }


def test_selection_matches_whole_components_only() -> None:
    selection = Selection.build(["v_head."])
    assert selection.rename("v_head.weight") == "weight"
    assert selection.rename("xv_head.weight") is None and selection.rename("v_headx.weight") is None
    assert Selection.build(["v_head"], keep_prefix=True).rename("v_head.bias") == "v_head.bias"
    assert Selection.build(["model", "model.v_head"]).rename("model.v_head.bias") == "bias"  # longest wins
    assert Selection.build([], ["v_head"]).rename("xv_head.weight") == "xv_head.weight"
    assert Selection.build(["v_head.weight"]).rename("v_head.weight") == "v_head.weight"


def test_selection_refuses_empty_results_collisions_and_bad_flags() -> None:
    with pytest.raises(
        UsageError, match=r"--prefix head selects no tensor; the top-level prefixes are: a, b"
    ):
        Selection.build(["head"]).apply(["a.x", "b.y", "a.z"])
    with pytest.raises(UsageError, match=r"would both be written as 'weight'"):
        Selection.build(["a", "b"]).apply(["a.weight", "b.weight"])
    for bad in ("", ".", "a..b", ".a"):
        with pytest.raises(UsageError, match="--prefix takes a dotted name"):
            Selection.build([bad])


def test_composite_dcp_parts_come_out_exactly(tmp_path: Path) -> None:
    src = COMPOSITE / "checkpoint"
    everything, data = convert(tmp_path, src)
    assert everything == live() and (data["kept"], data["dropped"]) == (10, 0)
    policy, data = convert(tmp_path, src, "--prefix", "policy")
    assert policy == part(live(), "policy") and (data["kept"], data["dropped"]) == (7, 3)
    head, data = convert(tmp_path, src, "--prefix", "v_head.")
    assert head == part(live(), "v_head") and set(head) == {"weight", "bias"}
    kept, _ = convert(tmp_path, src, "--prefix", "v_head", "--keep-prefix")
    assert kept == part(live(), "v_head", strip=False)
    rest, data = convert(tmp_path, src, "--exclude", "v_head")
    assert rest == {k: v for k, v in live().items() if not k.startswith("v_head.")}
    assert "xv_head.weight" in rest and data["dropped"] == 2
    both, _ = convert(
        tmp_path, src, "--prefix", "policy", "--prefix", "v_head", "--keep-prefix", "--exclude", "policy.mask"
    )
    assert set(both) == set(part(live(), "policy", strip=False)) - {"policy.mask"} | {
        "v_head.weight",
        "v_head.bias",
    }


def test_an_empty_selection_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out" / "m.safetensors"
    result = run_cli("consolidate", str(COMPOSITE / "checkpoint"), str(out), "--prefix", "critic")
    assert_one_line(
        result, 2, "--prefix critic selects no tensor; the top-level prefixes are: policy, v_head, xv_head"
    )
    assert not out.parent.exists()


def test_zero_prefix_and_exclude(tmp_path: Path, shared_fixtures: Path) -> None:
    case = ZERO / "z2-bf16-untied"
    reference = {
        t["name"]: (t["dtype"], t["shape"], t["sha256"])
        for t in json.loads((case / "reference" / "tensors.json").read_text())["tensors"]
    }
    short = {"F32": "float32", "I64": "int64"}
    proj_in, data = convert(tmp_path, case / "checkpoint", "--prefix", "proj_in")
    assert {n: (short[d], s, h) for n, (d, s, h) in proj_in.items()} == part(reference, "proj_in")
    assert data["dropped"] == len(reference) - 2
    rest, _ = convert(tmp_path, case / "checkpoint", "--exclude", "proj_in", "--exclude", "proj_out")
    assert set(rest) == {n for n in reference if not n.startswith(("proj_in.", "proj_out."))}


def test_zero_tied_alias_whose_owner_is_outside(tmp_path: Path, shared_fixtures: Path) -> None:
    src = ZERO / "z2-bf16-tied-frozen" / "checkpoint"
    out = tmp_path / "m.safetensors"
    result = run_cli("consolidate", str(src), str(out), "--json", "--prefix", "lm_head", "--prefix", "norm")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    assert any(
        "lm_head.weight is tied to embed.weight, which lies outside the selection" in w
        for w in data["warnings"]
    )
    assert {n for n, *_ in read_output(out)[1]} == {"weight", "bias"}  # norm.*; lm_head.weight not written
    copied, _ = convert(tmp_path, src, "--prefix", "lm_head", "--keep-tied")
    assert set(copied) == {"weight"}
    embed, _ = convert(tmp_path, src, "--prefix", "embed", "--keep-prefix", "--keep-tied")
    assert copied["weight"][2] == embed["embed.weight"][2]
