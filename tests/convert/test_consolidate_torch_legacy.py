"""consolidate on torch's legacy (pre-1.6, non-zip) files and on non-contiguous tensors of either serialization.

Inputs and references are made here with torch; every conversion runs in a subprocess where torch cannot be
imported (``BLOCK_TORCH``). Outputs are compared tensor by tensor with ``safetensors.torch.save_file`` of
``v.contiguous()``: dtype, shape and the sha256 of each tensor's bytes as the two safetensors headers place them.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptctl.errors import UsageError
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_file import MAX_VIEW_PIECES, PieceBudget, c_order_runs, storage_block
from ckptctl.formats.torch_legacy import read_legacy_torch
from ckptctl.formats.torch_state import open_file
from ckptctl.storage.location import Location
from tests.cli.test_without_torch import BLOCK_TORCH
from tests.convert.test_consolidate import read_output

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

Digests = dict[str, tuple[str, list[int], str]]


def run_blocked(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with torch unimportable; the returncode is ckptctl's exit code."""
    code = BLOCK_TORCH.replace("ARGS", repr(list(args)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    body, _, tail = result.stdout.rpartition("\nTORCH_LOADED ")
    loaded, _, exit_code = tail.strip().partition(" EXIT ")
    assert loaded == "False", result.stderr
    returncode = 0 if exit_code in ("0", "None") else int(exit_code)
    return subprocess.CompletedProcess(result.args, returncode, body, result.stderr)


def reference(tmp_path: Path, tensors: dict[str, Any]) -> Digests:
    """What safetensors writes for the same tensors made contiguous (cloned: save_file refuses shared memory)."""
    path = tmp_path / "reference.safetensors"
    safetensors_torch.save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return {n: (d, s, h) for n, d, s, h in read_output(path)[1]}


def convert(tmp_path: Path, src: Path) -> Digests:
    out = tmp_path / "out" / "model.safetensors"
    result = run_blocked("consolidate", str(src), str(out), "--force", "-q")
    assert result.returncode == 0, result.stderr
    return {n: (d, s, h) for n, d, s, h in read_output(out)[1]}


def save_legacy(obj: Any, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def views() -> dict[str, Any]:
    """Non-contiguous views as older tooling saves them: a transposed weight, slices with a step, a column
    slice, a 3-d permutation, a bf16 transpose, and a tensor after which another view of its storage lies."""
    g = torch.Generator().manual_seed(7)
    big = torch.randn(9, 10, generator=g)
    cube = torch.randn(2, 3, 4, generator=g)
    return {
        "transposed": torch.randn(6, 8, generator=g).t(),
        "rows_step": big[::2],
        "columns": big[:, 1:5],
        "inner_step": big[:, ::3],
        "permuted": cube.permute(2, 0, 1),
        "swapped": cube.transpose(1, 2),
        "bf16_t": torch.randn(5, 3, generator=g).to(torch.bfloat16).t(),
        "expanded_row": torch.arange(4).expand(3, 4),
    }


def test_legacy_single_file_of_every_dtype(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    storage = torch.randn(20, generator=g)
    state = {
        "w": torch.randn(4, 3, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(2, 5, generator=g).to(torch.float16),
        "position_ids": torch.arange(12).reshape(1, 12),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "head": storage[:6].view(2, 3),  # two tensors of one storage at different offsets
        "tail": storage[9:17],
    }
    src = save_legacy(state, tmp_path / "pytorch_model.bin")
    assert convert(tmp_path, src) == reference(tmp_path, state)


def test_legacy_hf_shards_with_an_index(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    g = torch.Generator().manual_seed(2)
    shards = [
        {
            "model.embed.weight": torch.randn(5, 4, generator=g),
            "model.norm": torch.ones(4, dtype=torch.bfloat16),
        },
        {
            "model.layers.0.w": torch.randn(4, 6, generator=g).t(),
            "lm_head.weight": torch.randn(5, 4, generator=g),
        },
    ]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        save_legacy(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    everything = {k: v for shard in shards for k, v in shard.items()}
    assert convert(tmp_path, folder) == reference(tmp_path, everything)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_non_contiguous_views_are_written_contiguous(tmp_path: Path, legacy: bool) -> None:
    state = views()
    src = tmp_path / "state.pt"
    torch.save(state, src, _use_new_zipfile_serialization=not legacy)
    assert convert(tmp_path, src) == reference(tmp_path, state)


def test_view_pieces_are_few_and_their_bytes_exact(tmp_path: Path) -> None:
    """In-process (torch only made the file): a transpose is one chunk per storage row, a row step one range
    per row, an inner step one range per element (adjacent ones merged); every source reads as
    ``t.contiguous()``."""
    state = views()
    torch.save(state, tmp_path / "state.pt")
    sources = open_file(Location.from_url(str(tmp_path)), "state.pt", (tmp_path / "state.pt").stat().st_size)
    for name, tensor in state.items():
        expected = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert sources[name].read() == expected, name
    assert len(sources["transposed"].chunks) == 6 and not sources["transposed"].ranges
    # the last column of a row and the first of the next are adjacent in the storage: one range
    assert len(sources["rows_step"].ranges) == 5 and len(sources["inner_step"].ranges) == 9 * 4 - 8
    assert c_order_runs((4, 6), (1, 4)) == (1, [(4, 1), (6, 4)])
    assert storage_block((2, 3, 4), (4, 8, 1)) == (8, (0, 2)) and storage_block((4, 2), (1, 4)) == (4, (0,))


def test_too_many_pieces_are_refused_before_any_plan_is_held(tmp_path: Path) -> None:
    torch.save({"every_other": torch.zeros(41)[::2]}, tmp_path / "state.pt")
    size = (tmp_path / "state.pt").stat().st_size
    with pytest.raises(UsageError, match=r"is 21 separate pieces, over the 20 left of the 1,000,000"):
        open_file(Location.from_url(str(tmp_path)), "state.pt", size, PieceBudget(20))
    save_legacy({"every_other": torch.zeros(2 * MAX_VIEW_PIECES + 2)[::2]}, tmp_path / "big.bin")
    result = run_blocked("consolidate", str(tmp_path / "big.bin"), str(tmp_path / "out" / "m.safetensors"))
    assert (
        result.returncode == 2
        and f"is {MAX_VIEW_PIECES + 1:,} separate pieces" in result.stderr.splitlines()[0]
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def assert_refused(tmp_path: Path, src: Path, text: str) -> None:
    out = tmp_path / "out"
    result = run_blocked("consolidate", str(src), str(out / "model.safetensors"))
    assert result.returncode == 8, result.stderr
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and lines[0].startswith("error: ") and text in lines[0], lines
    assert not any(line.startswith("error:") for line in lines[1:])
    assert not out.exists() or not any(out.iterdir())


def test_truncated_legacy_file_is_refused(tmp_path: Path) -> None:
    src = save_legacy({"w": torch.randn(64, 64), "b": torch.zeros(64)}, tmp_path / "pytorch_model.bin")
    src.write_bytes(src.read_bytes()[:-100])
    assert_refused(tmp_path, src, "data cut short")
    src.write_bytes(src.read_bytes()[:300])  # inside the pickles
    assert_refused(tmp_path, src, "truncated")


def test_legacy_file_whose_storage_count_differs_is_refused(tmp_path: Path) -> None:
    src = save_legacy({"w": torch.randn(8, 8), "b": torch.zeros(8)}, tmp_path / "pytorch_model.bin")
    legacy = read_legacy_torch(FileSource(Location.from_url(str(tmp_path)), src.name, src.stat().st_size))
    raw = bytearray(src.read_bytes())
    offset = legacy.storages[-1].count_offset
    raw[offset : offset + 8] = struct.pack("<q", legacy.storages[-1].numel + 1)
    src.write_bytes(bytes(raw))
    assert_refused(tmp_path, src, "the file counts")
