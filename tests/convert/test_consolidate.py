"""consolidate against DeepSpeed's own zero_to_fp32 output for every fixture case, and its bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SHARED_FIXTURES, run_cli

ZERO = SHARED_FIXTURES / "zero"
CASES = sorted(p.parent.name for p in ZERO.glob("*/checkpoint"))
VARIANTS = [
    (case, kind)
    for case in CASES
    for kind in ("", "-bf16", "-exclude-frozen")
    if (ZERO / case / f"reference{kind}").is_dir()
]


def read_output(path: Path) -> tuple[dict[str, str], list[tuple[str, str, list[int], str]]]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    base = 8 + size
    tensors = [
        (
            name,
            entry["dtype"],
            entry["shape"],
            hashlib.sha256(
                raw[base + entry["data_offsets"][0] : base + entry["data_offsets"][1]]
            ).hexdigest(),
        )
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    return header.get("__metadata__", {}), tensors


@pytest.mark.parametrize(("case", "kind"), VARIANTS)
def test_bit_identical_to_zero_to_fp32(case: str, kind: str, tmp_path: Path, shared_fixtures: Path) -> None:
    src = tmp_path / "checkpoint"
    shutil.copytree(ZERO / case / "checkpoint", src)
    flags = {"-bf16": ["--dtype", "bf16"], "-exclude-frozen": ["--exclude-frozen"], "": []}[kind]
    result = run_cli("consolidate", str(src), str(tmp_path / "model.safetensors"), "--json", *flags)
    assert result.returncode == 0, result.stderr
    reference = json.loads((ZERO / case / f"reference{kind}" / "tensors.json").read_text())["tensors"]
    metadata, ours = read_output(tmp_path / "model.safetensors")
    short = {"F32": "float32", "BF16": "bfloat16", "I64": "int64", "F16": "float16"}
    expected = [(t["name"], t["dtype"], t["shape"], t["sha256"]) for t in reference if not t.get("alias_of")]
    # ZeRO-1 saves no frozen_param_*: ckptctl writes the frozen params from `module` (zero_to_fp32 drops them),
    # after the buffers; every tensor zero_to_fp32 writes is still bit-identical.
    extra = (
        [t for t in ours if t[0].startswith("frozen_block.")] if case.startswith("z1") and kind == "" else []
    )
    assert [(n, short[d], s, h) for n, d, s, h in ours if (n, d, s, h) not in extra] == expected
    assert [t[0] for t in extra] == (["frozen_block.weight", "frozen_block.bias"] if extra else [])
    aliases = {t["name"]: t["alias_of"] for t in reference if t.get("alias_of")}
    assert json.loads(metadata.get("tied_aliases", "{}")) == aliases and metadata["format"] == "pt"
    summary = json.loads(result.stdout)["data"]
    assert summary["tensors"] == len(expected) + len(extra)
    if case.startswith("z1") and kind == "":
        assert any("does not store frozen parameters" in w for w in summary["warnings"])


def test_keep_tied_writes_the_alias_as_a_copy(tmp_path: Path, shared_fixtures: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert (
        run_cli(
            "consolidate", str(ZERO / "z2-bf16-tied-frozen" / "checkpoint"), str(out), "--keep-tied"
        ).returncode
        == 0
    )
    _, tensors = read_output(out)
    by_name = {n: h for n, _, _, h in tensors}
    assert by_name["lm_head.weight"] == by_name["embed.weight"]


def test_output_loads_with_safetensors(tmp_path: Path, shared_fixtures: Path) -> None:
    from safetensors.numpy import load_file

    out = tmp_path / "m.safetensors"
    assert run_cli("consolidate", str(ZERO / "z3-fp32-ws3" / "checkpoint"), str(out)).returncode == 0
    assert "embed.weight" in load_file(str(out))


def _copy(tmp_path: Path, case: str = "z2-bf16-tied-frozen") -> Path:
    src = tmp_path / "ckpt"
    shutil.copytree(ZERO / case / "checkpoint", src)
    return src


def assert_one_line(result, code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and text in result.stderr.splitlines()[0]


def test_missing_rank_file(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path)
    (src / "global_step3" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    result = run_cli("consolidate", str(src), str(tmp_path / "o.safetensors"))
    assert_one_line(result, 8, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt (expected world size 2")
    assert not (tmp_path / "o.safetensors").exists()


def test_truncated_shard(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path)
    shard = src / "global_step3" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-300])
    result = run_cli("consolidate", str(src), str(tmp_path / "o.safetensors"))
    assert_one_line(result, 8, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert list(tmp_path.glob("o.safetensors*")) == [] and not list(tmp_path.glob(".ckptctl-tmp-*"))


def test_latest_naming_a_missing_tag(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path)
    (src / "latest").write_text("global_step9")
    assert_one_line(
        run_cli("consolidate", str(src), str(tmp_path / "o.safetensors")), 8, "names tag 'global_step9'"
    )


def test_not_a_deepspeed_folder_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_bytes(b"x")
    assert_one_line(
        run_cli("consolidate", str(tmp_path / "x"), str(tmp_path / "o.safetensors")),
        3,
        "not a DeepSpeed checkpoint",
    )
    assert_one_line(
        run_cli("consolidate", str(tmp_path / "nope"), str(tmp_path / "o.safetensors")), 3, "no such file"
    )


def test_refuses_to_overwrite_without_force(tmp_path: Path, shared_fixtures: Path) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    result = run_cli("consolidate", str(ZERO / "z2-bf16-untied" / "checkpoint"), str(out))
    assert_one_line(result, 4, "exists; pass --force")
    assert out.read_bytes() == b"keep me"
    assert (
        run_cli("consolidate", str(ZERO / "z2-bf16-untied" / "checkpoint"), str(out), "--force").returncode
        == 0
    )


def test_a_malicious_pickle_in_a_shard_does_not_run(tmp_path: Path, shared_fixtures: Path) -> None:
    import os
    import pickle
    import zipfile

    src = _copy(tmp_path)
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shard = src / "global_step3" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(shard, "w") as archive:
        archive.writestr("x/data.pkl", pickle.dumps({"optimizer_state_dict": Evil()}, protocol=2))
    result = run_cli("consolidate", str(src), str(tmp_path / "o.safetensors"))
    assert result.returncode == 8 and "refusing to unpickle global" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
def test_source_on_an_object_store(backend, tmp_path: Path, shared_fixtures: Path) -> None:
    url = backend.put_tree(ZERO / "z3-fp32-ws3" / "checkpoint", "ckpt")
    out = tmp_path / "m.safetensors"
    result = run_cli("consolidate", url, str(out), *backend.cli_options)
    assert result.returncode == 0, result.stderr
    reference = json.loads((ZERO / "z3-fp32-ws3" / "reference" / "tensors.json").read_text())["tensors"]
    assert [h for *_, h in read_output(out)[1]] == [t["sha256"] for t in reference if not t.get("alias_of")]


def test_hf_shards_and_configs(tmp_path: Path, shared_fixtures: Path) -> None:
    """An HF Trainer checkpoint-N holding a DeepSpeed save: shards + index, config.json copied beside them."""
    from safetensors.numpy import load_file

    unit = tmp_path / "checkpoint-3"
    shutil.copytree(ZERO / "z2-bf16-untied" / "checkpoint", unit)
    (unit / "config.json").write_text('{"model_type": "toy"}')
    out = tmp_path / "model"
    result = run_cli("consolidate", str(unit), str(out), "--max-shard-size", "1KB", "--json")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    merged: dict[str, object] = {}
    for shard in shards:
        merged.update(load_file(str(out / shard)))
    reference = json.loads((ZERO / "z2-bf16-untied" / "reference" / "tensors.json").read_text())["tensors"]
    assert set(merged) == {t["name"] for t in reference} == set(index["weight_map"])
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'


def test_files_from_two_world_sizes_are_refused(tmp_path: Path, shared_fixtures: Path) -> None:
    """A rank file from a 3-rank save dropped into a 2-rank tag (a bad copy, a re-run with another world size)."""
    src = tmp_path / "ckpt"
    shutil.copytree(ZERO / "z3-bf16-tied-frozen" / "checkpoint", src)
    extra = ZERO / "z3-fp32-ws3" / "checkpoint" / "global_step3" / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    shutil.copy(extra, src / "global_step3" / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt")
    result = run_cli("consolidate", str(src), str(tmp_path / "o.safetensors"))
    assert_one_line(result, 8, "the model states say world size 2: files from two saves are mixed")


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_output_on_an_object_store_and_a_missing_bucket(
    backend, tmp_path: Path, shared_fixtures: Path
) -> None:
    src = str(ZERO / "z2-bf16-untied" / "checkpoint")
    result = run_cli(
        "consolidate", src, f"{backend.url}/out/", "--max-shard-size", "1KB", *backend.cli_options
    )
    assert result.returncode == 0, result.stderr
    location = backend.location("out")
    index = json.loads(location.read_bytes("model.safetensors.index.json"))
    assert {e.name for e in location.walk() if e.type == "file"} == {
        *index["weight_map"].values(),
        "model.safetensors.index.json",
    }
    single = run_cli("consolidate", src, f"{backend.url}/one/model.safetensors", *backend.cli_options)
    assert single.returncode == 0, single.stderr
    local = tmp_path / "m.safetensors"
    assert run_cli("consolidate", src, str(local)).returncode == 0
    assert backend.location("one").read_bytes("model.safetensors") == local.read_bytes()
    missing = run_cli(
        "consolidate",
        src,
        backend.url.replace("bucket-", "nobucket-") + "/m.safetensors",
        *backend.cli_options,
    )
    assert_one_line(missing, 3, "no such bucket")
