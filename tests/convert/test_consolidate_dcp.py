"""consolidate on PyTorch DCP folders: every case bit-identical to the live tensors of its model sub-tree (torch
not importable), the use_collectives=False merge, and the bad inputs (one line, exit code, nothing written)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_without_torch import run_without_torch
from tests.conftest import SHARED_FIXTURES, run_cli
from tests.convert.test_consolidate import assert_one_line, read_output

DCP = SHARED_FIXTURES / "dcp"
OURS = Path(__file__).resolve().parents[1] / "fixtures" / "dcp"
NON_MODEL = ("optimizer.", "lr_scheduler.", "train_state.", "dataloader.")
# case -> (checkpoint folder, its live_full.safetensors, prefix of the model sub-tree there)
CASES = {
    "torchtitan-fsdp2": (DCP / "torchtitan-fsdp2" / "checkpoint" / "step-3", DCP / "torchtitan-fsdp2", ""),
    "dtensor-tp-shard01": (DCP / "dtensor-tp-shard01" / "checkpoint", DCP / "dtensor-tp-shard01", "model."),
    "no-collectives": (OURS / "no-collectives" / "checkpoint", OURS / "no-collectives", ""),
}


def reference(case: str) -> dict[str, tuple[str, list[int], str]]:
    """The live tensors of the model sub-tree, named as model.state_dict() names them."""
    _, folder, strip = CASES[case]
    _, tensors = read_output(folder / "reference" / "live_full.safetensors")
    return {
        name[len(strip) :]: (dtype, shape, digest)
        for name, dtype, shape, digest in tensors
        if name.startswith(strip) and not name.startswith(NON_MODEL)
    }


def written(path: Path) -> dict[str, tuple[str, list[int], str]]:
    return {name: (dtype, shape, digest) for name, dtype, shape, digest in read_output(path)[1]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_identical_to_the_live_model_tensors_without_torch(
    case: str, tmp_path: Path, shared_fixtures: Path
) -> None:
    out = tmp_path / "model.safetensors"
    body, loaded, code = run_without_torch("consolidate", str(CASES[case][0]), str(out), "--json")
    assert code in ("0", "None") and not loaded, body
    assert written(out) == reference(case)
    data = json.loads(body)["data"]
    assert data["format"] == "dcp" and data["kept"] == len(reference(case))


def test_torchtitan_drops_the_training_state_and_finds_the_step_folder(
    tmp_path: Path, shared_fixtures: Path
) -> None:
    """Given the run's checkpoint/ folder, the only step-N/ in it is converted; optimizer, lr_scheduler and
    train_state tensors (64) are counted as dropped, and bf16 tensors stay bf16."""
    out = tmp_path / "m.safetensors"
    result = run_cli("consolidate", str(DCP / "torchtitan-fsdp2" / "checkpoint"), str(out), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    assert (data["kept"], data["dropped"]) == (23, 64)
    ours = written(out)
    assert ours == reference("torchtitan-fsdp2") and ours["mtp_head.weight"][0] == "BF16"
    assert ours["sink"][1] == [1, 16]  # the empty rank-1 chunk


def test_no_collectives_merges_every_rank_and_warns(tmp_path: Path) -> None:
    result = run_cli(
        "consolidate", str(CASES["no-collectives"][0]), str(tmp_path / "m.safetensors"), "--json"
    )
    assert result.returncode == 0, result.stderr
    assert any("use_collectives=False" in w for w in json.loads(result.stdout)["data"]["warnings"])


def test_dtype_casts_floats_only(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert (
        run_cli("consolidate", str(CASES["no-collectives"][0]), str(out), "--dtype", "fp32").returncode == 0
    )
    ours = written(out)
    assert ours["policy.half.weight"][0] == "F32" and ours["policy.tok_ids"][0] == "I64"
    assert (
        ours["policy.mask"][0] == "BOOL"
        and ours["policy.rows.weight"] == reference("no-collectives")["policy.rows.weight"]
    )


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_source_on_an_object_store(backend, tmp_path: Path, shared_fixtures: Path) -> None:
    url = backend.put_tree(CASES["dtensor-tp-shard01"][0], "dcp")
    out = tmp_path / "m.safetensors"
    result = run_cli("consolidate", url, str(out), *backend.cli_options)
    assert result.returncode == 0, result.stderr
    assert written(out) == reference("dtensor-tp-shard01")


# -- bad input ---------------------------------------------------------------------------------------------------


def _copy(tmp_path: Path, case: str = "torchtitan-fsdp2") -> Path:
    src = tmp_path / "ckpt"
    shutil.copytree(CASES[case][0], src)
    for path in [src, *src.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return src


def _convert_fails(tmp_path: Path, src: Path, code: int, text: str) -> None:
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir(exist_ok=True)
    assert_one_line(run_cli("consolidate", str(src), str(out)), code, text)
    assert list(out.parent.iterdir()) == []


def _edit_metadata(path: Path, edit: Any) -> None:
    """Rewrite a .metadata with torch (test-side only: the files are our own fixtures)."""
    pytest.importorskip("torch")
    metadata = pickle.loads(path.read_bytes())
    edit(metadata)
    path.write_bytes(pickle.dumps(metadata, protocol=4))


def test_missing_data_file_is_named(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path)
    (src / "__1_0.distcp").unlink()
    _convert_fails(tmp_path, src, 8, "__1_0.distcp: data file referenced by .metadata is missing")


def test_truncated_data_file(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path)
    data = src / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    _convert_fails(tmp_path, src, 8, "(truncated)")


def test_a_damaged_item_is_refused_before_writing(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path, "dtensor-tp-shard01")
    data = bytearray((src / "__0_0.distcp").read_bytes())
    data[1769 - 22 : 1769 - 18] = b"XXXX"  # the end record of the first item
    (src / "__0_0.distcp").write_bytes(bytes(data))
    _convert_fails(tmp_path, src, 8, "item of tensor 'model.attn.wqkv.weight' at 0")


def test_chunk_gap_names_the_tensor(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path)

    def drop_a_chunk(metadata: Any) -> None:
        metadata.state_dict_metadata["tok_embeddings.weight"].chunks.pop()

    _edit_metadata(src / ".metadata", drop_a_chunk)
    _convert_fails(tmp_path, src, 8, "tensor 'tok_embeddings.weight': chunks cover 304 of 592 elements")


def test_chunk_overlap_names_the_tensor(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path, "dtensor-tp-shard01")

    def overlap(metadata: Any) -> None:
        import torch
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        chunks = metadata.state_dict_metadata["model.attn.wqkv.weight"].chunks
        chunks[1] = ChunkStorageMetadata(offsets=torch.Size([5, 0]), sizes=chunks[1].sizes)

    _edit_metadata(src / ".metadata", overlap)
    _convert_fails(tmp_path, src, 8, "tensor 'model.attn.wqkv.weight': chunks at [0, 0] and [5, 0] overlap")


def test_no_collectives_with_a_rank_metadata_missing(tmp_path: Path) -> None:
    """torch's converter returns garbage rows here; a merge of the ranks left must not tile and is refused."""
    src = _copy(tmp_path, "no-collectives")
    (src / "__1.metadata").unlink()
    _convert_fails(tmp_path, src, 8, "tensor 'model.policy.rows.weight': chunks cover 24 of 42 elements")


def test_no_collectives_ranks_that_disagree_are_refused(tmp_path: Path) -> None:
    src = _copy(tmp_path, "no-collectives")

    def grow(metadata: Any) -> None:
        import torch

        metadata.state_dict_metadata["model.policy.rows.weight"].size = torch.Size([8, 6])

    _edit_metadata(src / "__1.metadata", grow)
    _convert_fails(tmp_path, src, 8, "the rank files cannot be merged")


@pytest.mark.parametrize(
    ("content", "text"),
    [
        (b"", "empty DCP metadata file"),
        (b"\x80\x04garbage", ".metadata"),
        (pickle.dumps({"a": 1}), "does not hold a DCP Metadata record"),
    ],
)
def test_metadata_garbage(tmp_path: Path, shared_fixtures: Path, content: bytes, text: str) -> None:
    src = _copy(tmp_path, "dtensor-tp-shard01")
    (src / ".metadata").write_bytes(content)
    _convert_fails(tmp_path, src, 8, text)


def test_a_poisoned_metadata_never_runs(tmp_path: Path, shared_fixtures: Path) -> None:
    import os

    src = _copy(tmp_path, "dtensor-tp-shard01")
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (src / ".metadata").write_bytes(pickle.dumps((Evil(), 1), protocol=4))
    _convert_fails(tmp_path, src, 8, "refusing to unpickle global")
    assert not marker.exists()


def test_a_folder_of_data_files_without_metadata(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path, "dtensor-tp-shard01")
    (src / ".metadata").unlink()
    _convert_fails(tmp_path, src, 8, "no .metadata (rank 0 writes it last")


def test_several_steps_need_a_tag(tmp_path: Path, shared_fixtures: Path) -> None:
    run = tmp_path / "run"
    for step in ("step-3", "step-6"):
        shutil.copytree(CASES["dtensor-tp-shard01"][0], run / step)
    _convert_fails(tmp_path, run, 3, "several DCP checkpoints here (step-3, step-6)")
    out = tmp_path / "m.safetensors"
    assert run_cli("consolidate", str(run), str(out), "--tag", "step-6").returncode == 0
    assert written(out) == reference("dtensor-tp-shard01")


def test_accelerate_save_state_folder_uses_the_model_checkpoint(
    tmp_path: Path, shared_fixtures: Path
) -> None:
    """Accelerate's FSDP save_state writes pytorch_model_fsdp_0/ ({"model": ...}) beside optimizer_0/."""
    state = tmp_path / "checkpoint_3"
    shutil.copytree(CASES["dtensor-tp-shard01"][0], state / "pytorch_model_fsdp_0")
    shutil.copytree(CASES["no-collectives"][0], state / "optimizer_0")
    out = tmp_path / "m.safetensors"
    assert run_cli("consolidate", str(state), str(out)).returncode == 0
    assert written(out) == reference("dtensor-tp-shard01")


def test_model_names_by_key_path_not_by_name() -> None:
    from ckptctl.formats.dcp import model_names

    titan = [
        ("model.embed.weight", ("model.embed.weight",)),
        ("optimizer.state.x", ("optimizer", "state", "x")),
    ]
    assert model_names(titan) == {"model.embed.weight": "model.embed.weight"}  # HF-style FQN, no wrapper
    wrapped = [("model.a.b", ("model", "a.b")), ("optim.lr", ("optim", "lr")), ("meta.x", ("meta", "x"))]
    assert model_names(wrapped) == {"model.a.b": "a.b"}
    plain = [
        ("w", ("w",)),
        ("train_state.step", ("train_state", "step")),
        ("dataloader.s", ("dataloader", "s")),
    ]
    assert model_names(plain) == {"w": "w"}


def test_chunks_assemble_in_c_order_for_any_tiling(tmp_path: Path) -> None:
    """Shard(1) and 2-d block tilings go through the in-memory path, Shard(0) through the streaming one."""
    import numpy as np

    from ckptctl.formats.tensor_layout import Chunk, Range, TensorSource, slab_ranges
    from ckptctl.storage.location import Location

    full = np.arange(5 * 7, dtype="<i4").reshape(5, 7)
    blocks = [((0, 0), (2, 3)), ((0, 3), (2, 4)), ((2, 0), (3, 7))]
    data, chunks = b"", []
    for (r, c), (h, w) in blocks:
        piece = full[r : r + h, c : c + w].tobytes()
        chunks.append(Chunk((r, c), (h, w), Range("blob", len(data), len(data) + len(piece))))
        data += piece
    (tmp_path / "blob").write_bytes(data)
    location = Location.from_url(str(tmp_path))
    assert slab_ranges((5, 7), tuple(chunks)) is None
    assert (
        TensorSource(location, "t", "int32", (5, 7), chunks=tuple(reversed(chunks))).read() == full.tobytes()
    )
    rows = (Chunk((3, 0), (2, 7), Range("blob", 0, 56)), Chunk((0, 0), (3, 7), Range("blob", 56, 140)))
    assert slab_ranges((5, 7), rows) == (Range("blob", 56, 140), Range("blob", 0, 56))


def test_a_storage_entry_with_a_crafted_offset(tmp_path: Path, shared_fixtures: Path) -> None:
    src = _copy(tmp_path, "dtensor-tp-shard01")

    def craft(metadata: Any) -> None:
        info = next(iter(metadata.storage_data.values()))
        info.offset = "1769"

    _edit_metadata(src / ".metadata", craft)
    _convert_fails(tmp_path, src, 8, ".metadata: storage entry of __0_0.distcp: invalid offset or length")
