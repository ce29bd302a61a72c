"""Reader edge cases users hit: sharded safetensors, DCP data files cut or corrupted, dtypes, the legacy torch
format, and a catalog that uses the same checks."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from ckptctl.errors import IntegrityError
from ckptctl.formats.quick_check import quick_check_file
from ckptctl.inspect import inspect_checkpoint
from ckptctl.storage.location import Location
from tests.cli.test_inspect import DCP, copy_fixture
from tests.cli.test_without_torch import run_without_torch


def _sharded(folder: Path) -> Path:
    folder.mkdir()
    save_file(
        {"a.w": np.zeros((4, 3), np.float32), "a.b": np.zeros(3, np.float16)}, str(folder / "m-1.safetensors")
    )
    save_file({"b.w": np.zeros((2, 2), np.int64)}, str(folder / "m-2.safetensors"))
    index = {
        "metadata": {"total_size": 48 + 6 + 32},
        "weight_map": {"a.w": "m-1.safetensors", "a.b": "m-1.safetensors", "b.w": "m-2.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    return folder


def test_sharded_safetensors_reads_every_shard(tmp_path: Path) -> None:
    result = inspect_checkpoint(str(_sharded(tmp_path / "model")))
    assert result.format == "safetensors-sharded" and result.complete and not result.notes
    assert {(t.name, t.dtype, t.shape, t.file) for t in result.tensors} == {
        ("a.w", "float32", (4, 3), "m-1.safetensors"),
        ("a.b", "float16", (3,), "m-1.safetensors"),
        ("b.w", "int64", (2, 2), "m-2.safetensors"),
    }
    assert result.parameters == 12 + 3 + 4
    assert sorted(f.path for f in result.files) == [
        "config.json",
        "m-1.safetensors",
        "m-2.safetensors",
        "model.safetensors.index.json",
    ]
    index_only = inspect_checkpoint(str(tmp_path / "model" / "model.safetensors.index.json"))
    assert index_only.tensors == result.tensors


def test_sharded_safetensors_missing_shard_and_wrong_mapping(tmp_path: Path) -> None:
    folder = _sharded(tmp_path / "model")
    (folder / "m-2.safetensors").unlink()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["a.extra"] = "m-1.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    defects = {str(d) for d in inspect_checkpoint(str(folder)).defects}
    assert defects == {
        "m-2.safetensors: shard named in the index is missing",
        "m-1.safetensors: index maps 'a.extra' here, the shard does not hold it",
    }


def test_safetensors_dtypes_and_spans(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file(
        {"e": np.zeros((0, 4), np.float32), "s": np.array(3, np.int64), "u": np.zeros(3, np.uint16)},
        str(path),
    )
    result = inspect_checkpoint(str(path))
    assert {t.name: (t.dtype, t.shape, t.nbytes) for t in result.tensors} == {
        "e": ("float32", (0, 4), 0),
        "s": ("int64", (), 8),
        "u": ("uint16", (3,), 6),
    }
    raw = path.read_bytes()
    path.write_bytes(raw + b"\0" * 10)  # bytes after the last tensor are a defect too
    assert "10 bytes after the last tensor" in str(inspect_checkpoint(str(path)).defects[0])


def test_dcp_truncated_data_file_is_named_without_verify(tmp_path: Path) -> None:
    step = copy_fixture(DCP, tmp_path / "step-3")
    data = (step / "__1_0.distcp").read_bytes()
    (step / "__1_0.distcp").write_bytes(data[:-1000])
    defects = inspect_checkpoint(str(step)).defects
    assert [d.file for d in defects] == ["__1_0.distcp"] and "truncated" in defects[0].message


def test_dcp_corrupt_item_needs_verify(tmp_path: Path) -> None:
    step = copy_fixture(DCP, tmp_path / "step-3")
    data = bytearray((step / "__0_0.distcp").read_bytes())
    data[0:4] = b"XXXX"  # the first item's zip header
    (step / "__0_0.distcp").write_bytes(bytes(data))
    assert inspect_checkpoint(str(step)).complete
    defects = inspect_checkpoint(str(step), verify=True).defects
    assert [str(d) for d in defects] == ["__0_0.distcp: item at 0 (+" + defects[0].message.split("+")[1]]
    assert "not a whole torch.save archive" in defects[0].message


def test_dcp_without_global_metadata(tmp_path: Path) -> None:
    step = copy_fixture(DCP, tmp_path / "step-3")
    (step / ".metadata").rename(step / "__0.metadata")
    described = inspect_checkpoint(str(step))  # read as a use_collectives=False save of one rank file
    assert described.complete and described.facts["dcp"]["metadata_files"] == ["__0.metadata"]
    assert any("use_collectives=False" in note for note in described.notes)
    (step / "__0.metadata").unlink()
    with pytest.raises(IntegrityError, match=r"no \.metadata \(rank 0 writes it last"):
        inspect_checkpoint(str(step))


LEGACY = """
import sys, torch
torch.save({"w": torch.zeros(2, 3), "n": torch.ones(4, dtype=torch.int64)}, sys.argv[1],
           _use_new_zipfile_serialization=False)
"""


def test_legacy_torch_format_is_read_without_torch(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    subprocess.run([sys.executable, "-c", LEGACY, str(path)], check=True)
    body, loaded, code = run_without_torch("inspect", str(path), "--json", "--verify")
    assert code in ("0", "None") and not loaded
    data = json.loads(body)["data"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in data["tensors"]] == [
        ("w", "float32", [2, 3]),
        ("n", "int64", [4]),
    ]
    assert data["complete"] and data["verified"] and data["facts"]["torch"]["serialization"] == "legacy"


def test_catalog_quick_check_uses_the_readers(tmp_path: Path) -> None:
    base = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "lora" / "bases" / "llama"
    shutil.copy(base / "model.safetensors", tmp_path / "ok.safetensors")
    raw = (base / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-100])
    location = Location.from_url(str(tmp_path))
    ok = quick_check_file(location, "ok.safetensors", len(raw))
    cut = quick_check_file(location, "cut.safetensors", len(raw) - 100)
    assert ok.ok is True and cut.ok is False and cut.reason.startswith("data cut short")


def _torch_zip(path: Path, pickled: bytes) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{path.stem}/data.pkl", pickled)
        archive.writestr(f"{path.stem}/data/0", b"\0" * 16)
    return path


def _u(text: str) -> bytes:
    return b"X" + len(text).to_bytes(4, "little") + text.encode()


# _rebuild_tensor_v2(storage ('storage', FloatStorage, '0', 'cpu', 4), 0, ('x',), (1,), False, {}), by hand:
# a crafted pickle that calls an allowed function with arguments of the wrong kind.
BAD_SHAPE = (
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
    + b"("
    + _u("storage")
    + b"ctorch\nFloatStorage\n"
    + _u("0")
    + _u("cpu")
    + b"K\x04tQ"
    + b"K\x00("
    + _u("x")
    + b"t(K\x01t\x89}tR."
)


def _cycle() -> bytes:
    looped: list[object] = []
    looped.append(looped)
    return pickle.dumps(looped, protocol=2)


CYCLE = _cycle()


@pytest.mark.parametrize(
    ("pickled", "message"),
    [
        (BAD_SHAPE, "invalid shape"),
        (CYCLE, "cycle"),
        (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01tR.", "not a valid pickle"),
        (b"\x80\x02}q\x00(X\x01", "ends before its STOP opcode"),
    ],
)
def test_crafted_pickles_are_integrity_errors(tmp_path: Path, pickled: bytes, message: str) -> None:
    path = _torch_zip(tmp_path / "crafted.pt", pickled)
    with pytest.raises(IntegrityError, match=message):
        inspect_checkpoint(str(path))


def test_zip64_directory(tmp_path: Path) -> None:
    """Checkpoints over 4 GiB (or with over 65,535 members) end with zip64 records; made small here by count."""
    import zipfile

    from ckptctl.formats.source import FileSource
    from ckptctl.formats.torch_zip import read_zip_directory

    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("many/data.pkl", pickle.dumps({}, protocol=2))
        for index in range(70_000):
            archive.writestr(f"many/data/{index}", b"")
    raw = path.read_bytes()
    assert b"PK\x06\x06" in raw[-1024:]  # the zip64 end record is really there
    source = FileSource(Location.from_url(str(tmp_path)), path.name, len(raw))
    directory = read_zip_directory(source)
    assert len(directory.members) == 70_001 and directory.members[-1].name == "many/data/69999"
    assert inspect_checkpoint(str(path)).tensors == ()


def test_allow_list_keeps_plain_values_and_refuses_the_rest() -> None:
    from ckptctl.errors import UnsafePickleError
    from ckptctl.formats.restricted_pickle import restricted_loads

    value = {"b": b"\x00\xff", "ba": bytearray(b"xy"), "s": {1, 2}, "f": frozenset([3]), "c": 1 + 2j}
    assert restricted_loads(pickle.dumps(value, protocol=2)) == value
    for crafted, refused in (
        (b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.", "bytearray(int)"),  # 1 GiB of zeros
        (b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.", "builtins.eval"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x001X\x05\x00\x00\x00rot13\x86R.", "encoding 'rot13'"),
    ):
        with pytest.raises(UnsafePickleError, match=re.escape(refused)):
            restricted_loads(crafted)


FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
# (file to damage, where most flips land: the pickle / header at its start)
DAMAGEABLE = [
    (
        FIXTURES / "zero" / "z2-bf16-untied" / "checkpoint" / "global_step3" / "mp_rank_00_model_states.pt",
        3000,
    ),
    (FIXTURES / "dcp" / "dtensor-tp-shard01" / "checkpoint" / ".metadata", 2414),
    (FIXTURES / "lora" / "lora_basic" / "adapter" / "adapter_model.safetensors", 4000),
]


@pytest.mark.parametrize(("original", "hot"), DAMAGEABLE, ids=lambda v: getattr(v, "name", str(v)))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_never_raise_anything_but_ckptctl_errors(
    tmp_path: Path, original: Path, hot: int, data: st.DataObject
) -> None:
    """Whatever bytes of a real checkpoint file are changed, inspect either reads it or raises a
    CkptctlError (one line and an exit code): never a traceback."""
    from ckptctl.errors import CkptctlError

    raw = bytearray(original.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        limit = data.draw(st.sampled_from([min(hot, len(raw)), len(raw)]))
        raw[data.draw(st.integers(0, limit - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / original.name
    path.write_bytes(bytes(raw))
    with contextlib.suppress(CkptctlError):
        inspect_checkpoint(str(path), verify=True)
