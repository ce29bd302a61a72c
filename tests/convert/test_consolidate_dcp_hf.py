"""consolidate on saves of DCP's Hugging Face writer (``sharded/shard-R-model-I-of-N.safetensors``): each fixture
bit-identical to the live model's tensors (torch not importable), integer and bool buffers as stored, and a missing
rank file refused before anything is written (one line, exit 8), which torch's own consolidator does not do."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckptctl.formats.model import SAFETENSORS_CODE
from tests.cli.test_without_torch import run_without_torch
from tests.conftest import run_cli
from tests.convert.test_consolidate import assert_one_line, read_output

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "dcp_hf"
CASES = ("sharded-only", "consolidated")
SHARDED = "step-2/sharded"


def reference(case: str, prefix: str = "") -> dict[str, tuple[str, list[int], str]]:
    """tensors.json (torch dtype names) as read_output gives a safetensors file (safetensors codes)."""
    tensors = json.loads((HERE / case / "reference" / "tensors.json").read_text())["tensors"]
    return {
        name[len(prefix) :]: (SAFETENSORS_CODE[t["dtype"]], t["shape"], t["sha256"])
        for name, t in tensors.items()
        if name.startswith(prefix)
    }


def written(path: Path) -> dict[str, tuple[str, list[int], str]]:
    return {name: (dtype, shape, digest) for name, dtype, shape, digest in read_output(path)[1]}


@pytest.mark.parametrize("case", CASES)
def test_bit_identical_to_the_live_model_without_torch(case: str, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    body, loaded, code = run_without_torch("consolidate", str(HERE / case / "step-2"), str(out), "--json")
    assert code in ("0", "None") and not loaded, body
    assert written(out) == reference(case)
    data = json.loads(body)["data"]
    assert data["format"] == "dcp-hf" and data["world_size"] == 2
    if case == "sharded-only":  # int64 and bool buffers, which torch's consolidator cannot size
        assert written(out)["policy.tok_ids"][0] == "I64" and written(out)["policy.mask"][0] == "BOOL"
        assert any("no model.safetensors.index.json" in w for w in data["warnings"])
    else:
        assert any(w.startswith("read the consolidated model-00001-of-00002") for w in data["warnings"])


def test_prefix_selects_and_strips(tmp_path: Path) -> None:
    out = tmp_path / "policy.safetensors"
    result = run_cli("consolidate", str(HERE / "sharded-only" / SHARDED), str(out), "--prefix", "policy.")
    assert result.returncode == 0, result.stderr
    assert written(out) == reference("sharded-only", "policy.")


def test_memory_store_source_without_the_consolidated_files(tmp_path: Path) -> None:
    """On memory://, with one consolidated file gone: the pieces in sharded/ are read, checked against the
    index's total_size, and say so."""
    from fsspec.implementations.memory import MemoryFileSystem

    from ckptctl.convert.consolidate import consolidate
    from ckptctl.storage import Location

    fs = MemoryFileSystem()
    root = "/dcp-hf-test"
    try:
        for path in (HERE / "consolidated" / "step-2").rglob("*"):
            if path.is_file() and path.name != "model-00001-of-00002.safetensors":
                fs.pipe_file(
                    f"{root}/{path.relative_to(HERE / 'consolidated').as_posix()}", path.read_bytes()
                )
        out = tmp_path / "m.safetensors"
        result = consolidate(Location.from_url(f"memory://{root}"), str(out))
        assert written(out) == reference("consolidated")
        assert any("model-00001-of-00002.safetensors named by" in w for w in result.warnings)
    finally:
        fs.rm(root, recursive=True)


def test_find_folder_in_a_run() -> None:
    from ckptctl.errors import NotFoundError
    from ckptctl.formats.dcp_hf import find_dcp_hf_folder
    from ckptctl.storage.location import FileEntry

    def entries(*paths: str) -> list[FileEntry]:
        return [FileEntry(p, "file", 1, None) for p in paths]

    shard = "sharded/shard-00001-model-00001-of-00001.safetensors"
    assert find_dcp_hf_folder(entries(shard, "model.safetensors.index.json"), None) == "sharded"
    assert find_dcp_hf_folder(entries(f"step-2/{shard}"), None) == "step-2/sharded"
    assert find_dcp_hf_folder(entries("model-00001-of-00001.safetensors"), None) is None
    with pytest.raises(NotFoundError, match="several DCP HF-writer checkpoints here"):
        find_dcp_hf_folder(entries(f"step-2/{shard}", f"step-4/{shard}"), None)
    assert find_dcp_hf_folder(entries(f"step-2/{shard}", f"step-4/{shard}"), "step-4") == "step-4/sharded"


# -- bad input: refused with one line, exit 8, nothing under OUT -------------------------------------------------


def _copy(tmp_path: Path, case: str) -> Path:
    src = tmp_path / "step-2"
    shutil.copytree(HERE / case / "step-2", src)
    return src


@dataclass
class _Result:
    returncode: int
    stderr: str


def _cli_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> _Result:
    """``ckptctl ARGS`` through ``cli.app.main`` in this process: the bad cases need no interpreter each (the
    run_cli subprocess costs ~1 s of CPU on this shared machine; the first tests above use it)."""
    from ckptctl.cli.app import main

    monkeypatch.setattr(sys, "argv", ["ckptctl", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    return _Result(int(exit_info.value.code or 0), capsys.readouterr().err)


@pytest.fixture
def fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """``fails(src, text)``: consolidate SRC exits 8 with one error line holding ``text``, nothing under OUT."""

    def check(src: Path, text: str) -> None:
        out = tmp_path / "out" / "m.safetensors"
        out.parent.mkdir()
        assert_one_line(_cli_in_process(capsys, monkeypatch, "consolidate", str(src), str(out)), 8, text)
        assert list(out.parent.iterdir()) == []

    return check


def _set_offsets(path: Path, name: str, offsets: list[int]) -> None:
    """Rewrite one piece's saved_offsets in a shard's DCP_SHARDING_INFO (the data is unchanged)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
    info[name]["saved_offsets"] = offsets
    header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def test_a_rank_file_removed_is_named(tmp_path: Path, fails) -> None:
    """torch's consolidator returns success here with embed.weight [4, 4] instead of [7, 4] and tok_ids lost."""
    src = _copy(tmp_path, "sharded-only")
    (src / "sharded" / "shard-00002-model-00001-of-00002.safetensors").unlink()
    fails(src, "shard-00002-model-00001-of-00002.safetensors is missing: rank 2 wrote")


def test_rank_numbers_that_skip(tmp_path: Path, fails) -> None:
    src = _copy(tmp_path, "sharded-only")
    for path in (src / "sharded").glob("shard-00001-*"):
        path.unlink()
    fails(src, "no shard-00001-model-*-of-00002.safetensors: rank 1 is missing")


def test_a_gap_names_the_tensor(tmp_path: Path, fails) -> None:
    src = _copy(tmp_path, "sharded-only")
    _set_offsets(
        src / "sharded" / "shard-00002-model-00001-of-00002.safetensors", "policy.embed.weight", [5, 0]
    )
    fails(src, "tensor 'policy.embed.weight': chunks cover 28 of 32 elements")


def test_an_overlap_names_the_tensor(tmp_path: Path, fails) -> None:
    src = _copy(tmp_path, "sharded-only")
    _set_offsets(
        src / "sharded" / "shard-00002-model-00001-of-00002.safetensors", "policy.proj.weight", [2, 0]
    )
    fails(src, "tensor 'policy.proj.weight': chunks cover 20 of 16 elements")


def test_consolidated_siblings_disagreeing_with_the_pieces(tmp_path: Path, fails) -> None:
    """A whole rank gone leaves no gap (the last rank's rows just end early); the consolidated headers show it."""
    src = _copy(tmp_path, "consolidated")
    for path in (src / "sharded").glob("shard-00002-*"):
        path.unlink()
    fails(
        src,
        "tensor 'policy.embed.weight' is float32 [7, 4] there, its pieces in sharded/ make float32 [4, 4]",
    )


def test_one_rank_file_given_alone_is_refused(fails) -> None:
    """Read as a plain safetensors file it would give rank 1's rows as if they were the whole tensors."""
    one = HERE / "sharded-only" / SHARDED / "shard-00001-model-00001-of-00002.safetensors"
    fails(one, "holds one rank's pieces of a DCP HF-writer")


def test_pieces_that_do_not_start_at_zero(tmp_path: Path, fails) -> None:
    """Rank 1's files lost and rank 2's renumbered as rank 1: the numbering looks whole, the rows start at 4."""
    src = _copy(tmp_path, "sharded-only")
    for path in (src / "sharded").glob("shard-00001-*"):
        path.unlink()
    for path in (src / "sharded").glob("shard-00002-*"):
        path.rename(path.with_name(path.name.replace("shard-00002", "shard-00001")))
    fails(src, "tensor 'policy.embed.weight': chunks cover 12 of 28 elements of the shape [7, 4]")
