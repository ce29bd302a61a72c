"""Hostile and malformed input (issue 15) for the readers: every case is a one-line error with exit 8 (or a
bounded defect list), within a memory cap and a few seconds — never a MemoryError, RecursionError, struct.error,
zlib.error, StopIteration or a renderer's crash."""

from __future__ import annotations

import json
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from ckptctl.errors import IntegrityError
from ckptctl.formats import restricted_pickle
from ckptctl.formats.quick_check import quick_check_file
from ckptctl.formats.restricted_pickle import restricted_loads
from ckptctl.inspect import inspect_checkpoint
from ckptctl.storage.location import Location
from tests.cli.test_inspect import ZERO, assert_one_line_error, copy_fixture
from tests.conftest import SHARED_FIXTURES
from tests.formats.torch_files import torch_files

__all__ = ["torch_files"]

MEMORY_CAP = 512 * 1024 * 1024
DCP = SHARED_FIXTURES / "dcp" / "dtensor-tp-shard01" / "checkpoint"


def capped_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``ckptctl`` in a subprocess whose address space is capped (a memo bomb needs GBs) and timed."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    return subprocess.run(
        [sys.executable, "-m", "ckptctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap,
    )


def zip_file(path: Path, members: list[tuple[str, bytes, int]], **central: object) -> Path:
    """A zip written by hand, so that its directory can say what a real writer never would: ``central``
    overrides fields of the first central entry (``csize``, ``usize``, ``extra``)."""
    local, directory = b"", b""
    for index, (name, data, method) in enumerate(members):
        packed = zlib.compress(data)[2:-4] if method == 8 else data
        fields = {"csize": len(packed), "usize": len(data), "extra": b""}
        if index == 0:
            fields.update(central)
        encoded = name.encode()
        offset = len(local)
        local += struct.pack(
            "<4s5H3I2H",
            b"PK\x03\x04",
            20,
            0,
            method,
            0,
            0,
            zlib.crc32(data),
            len(packed),
            len(data),
            len(encoded),
            0,
        )
        local += encoded + packed
        extra = fields["extra"]
        assert isinstance(extra, bytes)
        directory += struct.pack(
            "<4s6H3I5H2I",
            b"PK\x01\x02",
            20,
            20,
            0,
            method,
            0,
            0,
            zlib.crc32(data),
            fields["csize"],
            fields["usize"],
            len(encoded),
            len(extra),
            0,
            0,
            0,
            0,
            offset,
        )
        directory += encoded + extra
    end = struct.pack(
        "<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), len(local), 0
    )
    path.write_bytes(local + directory + end)
    return path


def torch_zip(path: Path, pickled: bytes, method: int = 0) -> Path:
    return zip_file(path, [(f"{path.stem}/data.pkl", pickled, method), (f"{path.stem}/version", b"3\n", 0)])


def quick(path: Path) -> bool | None:
    return quick_check_file(Location.from_url(str(path.parent)), path.name, path.stat().st_size).ok


# -- the restricted unpickler ------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [2**27, 2**32 - 1])
def test_memo_index_bomb_costs_nothing(tmp_path: Path, index: int) -> None:
    """A 127-byte data.pkl whose LONG_BINPUT asks for memo slot 2**27 cost 2.1 GB in the C unpickler."""
    pickled = (b"\x80\x02}r" + struct.pack("<I", index) + b".").ljust(127, b"\x00")
    path = torch_zip(tmp_path / "bomb.pt", pickled)
    started = time.monotonic()
    assert_one_line_error(capped_cli("inspect", str(path)), 8, "bomb.pt", f"memo index {index}")
    assert time.monotonic() - started < 10


def test_memo_index_bomb_in_dcp_metadata(tmp_path: Path) -> None:
    checkpoint = copy_fixture(DCP, tmp_path / "step-1")
    (checkpoint / ".metadata").write_bytes(b"\x80\x04}r\xff\xff\xff\xff.")
    assert_one_line_error(capped_cli("inspect", str(checkpoint)), 8, ".metadata", "memo index 4294967295")


def test_nesting_and_sharing_are_bounded(tmp_path: Path) -> None:
    marks = b"\x80\x02" + b"(" * 5000 + b"."
    with pytest.raises(IntegrityError, match="nested more than 1000 levels"):
        restricted_loads(marks)
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."  # nested single-item lists, no MARK
    assert_one_line_error(
        capped_cli("inspect", str(torch_zip(tmp_path / "deep.pt", deep))), 8, "nested too deeply"
    )
    shared: list[object] = [0]
    for _ in range(40):  # 2**40 paths through 41 lists: a few hundred bytes
        shared = [shared, shared]
    laughs = pickle.dumps({"x": shared}, protocol=2)
    assert len(laughs) < 1000
    started = time.monotonic()
    assert_one_line_error(
        capped_cli("inspect", str(torch_zip(tmp_path / "laughs.pt", laughs))), 8, "paths multiply"
    )
    assert time.monotonic() - started < 20


def test_container_size_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restricted_pickle, "MAX_CONTAINER_ITEMS", 100)
    with pytest.raises(IntegrityError, match="over 100 items"):
        restricted_loads(pickle.dumps(list(range(1000)), protocol=2))
    with pytest.raises(IntegrityError, match="over 100 items"):
        restricted_loads(pickle.dumps({i: i for i in range(1000)}, protocol=4))
    assert restricted_loads(pickle.dumps(list(range(100)), protocol=2)) == list(range(100))


def test_buffers_larger_than_the_pickle_are_refused() -> None:
    pickled = b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"."  # BYTEARRAY8 of 1 TiB
    with pytest.raises(IntegrityError, match="buffer in a"):
        restricted_loads(pickled)


def test_huge_pickled_ints_render(tmp_path: Path) -> None:
    """A 5,000-digit int (LONG4) reaches the metadata: the JSON writer and the table show it as text."""
    path = torch_zip(tmp_path / "big-int.pt", pickle.dumps({"step": 10**5000, "epoch": 3}, protocol=2))
    result = capped_cli("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    metadata = json.loads(result.stdout)["data"]["metadata"]
    assert metadata["step"] == "<integer of 16,610 bits>" and metadata["epoch"] == 3
    table = capped_cli("inspect", str(path))
    assert table.returncode == 0 and "step=<integer of 16,610 bits>" in table.stdout, table.stderr


def test_huge_tensor_dimensions_are_refused(tmp_path: Path) -> None:
    pickled = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00\x8a\xff"
        + b"\x01" * 255
        + b"\x85K\x01\x85\x89}tR."
    )
    with pytest.raises(IntegrityError, match="invalid shape"):
        inspect_checkpoint(str(torch_zip(tmp_path / "dims.pt", pickled)))


# -- the zip reader ----------------------------------------------------------------------------------------------


def test_deflate_bombs_and_bad_deflate(tmp_path: Path) -> None:
    data = pickle.dumps({"a": 1}, protocol=2)
    # Declares 2 GiB: over the limit for a pickle, refused before anything is inflated.
    path = zip_file(tmp_path / "bomb.pt", [("bomb/data.pkl", data, 8)], usize=2**31)
    assert_one_line_error(capped_cli("inspect", str(path)), 8, "bomb.pt", "over the")
    # Inflates to more than it declares.
    path = zip_file(tmp_path / "more.pt", [("more/data.pkl", b"\x80\x02." + b"\0" * 10_000, 8)], usize=100)
    assert_one_line_error(
        capped_cli("inspect", str(path)), 8, "inflates to 101+ bytes, the directory says 100"
    )
    # Method 8 whose bytes are not deflate at all.
    raw = bytearray(torch_zip(tmp_path / "junk.pt", b"\xff" * 64, method=0).read_bytes())
    raw[8] = 8  # local header: method
    start = raw.index(b"PK\x01\x02")
    raw[start + 10] = 8  # central entry: method
    (tmp_path / "junk.pt").write_bytes(bytes(raw))
    assert_one_line_error(capped_cli("inspect", str(tmp_path / "junk.pt")), 8, "not valid deflate data")


def test_zip64_fields_short_or_missing(tmp_path: Path) -> None:
    pickled = pickle.dumps({}, protocol=2)
    missing = zip_file(tmp_path / "missing.pt", [("missing/data.pkl", pickled, 0)], csize=0xFFFFFFFF)
    assert_one_line_error(capped_cli("inspect", str(missing)), 8, "zip64 extra field, which is missing")
    short = zip_file(
        tmp_path / "short.pt",
        [("short/data.pkl", pickled, 0)],
        csize=0xFFFFFFFF,
        usize=0xFFFFFFFF,
        extra=struct.pack("<HHQ", 1, 8, len(pickled)),
    )
    assert_one_line_error(capped_cli("inspect", str(short)), 8, "zip64 extra field is short (8 bytes)")
    for path in (missing, short):
        assert quick(path) is None  # damaged, not cut: never "incomplete"


def test_end_records_understating_the_directory(tmp_path: Path) -> None:
    """zipfile and torch.load refuse a directory smaller than its entries; so does every ckptctl reader (it used
    to pass --verify). torch writes both end records (zip64 and classic): cut in both, or only in one."""
    source = SHARED_FIXTURES / "lora" / "lora_basic" / "full_state_dict.pt"
    original = source.read_bytes()
    end = original.rindex(b"PK\x05\x06")
    zip64 = original.rindex(b"PK\x06\x06")
    (cd_size,) = struct.unpack("<I", original[end + 12 : end + 16])
    path = tmp_path / "model.pt"
    for records in ("both", "classic"):
        raw = bytearray(original)
        raw[end + 12 : end + 16] = struct.pack("<I", cd_size - 46)
        if records == "both":
            raw[zip64 + 40 : zip64 + 48] = struct.pack("<Q", cd_size - 46)
        path.write_bytes(bytes(raw))
        if records == "both":
            with pytest.raises(zipfile.BadZipFile), zipfile.ZipFile(path) as archive:
                archive.read(archive.namelist()[0])
        assert_one_line_error(capped_cli("inspect", str(path), "--verify"), 8, "model.pt", "(corrupt)")
        assert quick(path) is None


def test_safetensors_header_nested_too_deeply(tmp_path: Path) -> None:
    header = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert_one_line_error(capped_cli("inspect", str(path)), 8, "nested too deeply")
    assert quick(path) is None


# -- numbers inside checkpoints ----------------------------------------------------------------------------------

REWRITE_STATES = """
import sys, torch
path = sys.argv[1]
states = torch.load(path, weights_only=False)  # the shared fixture: trusted, written by DeepSpeed
states[sys.argv[2]] = int(eval(sys.argv[3]))
torch.save(states, path)
"""


@pytest.mark.parametrize(("field", "value"), [("dp_world_size", "10**9"), ("mp_world_size", "10**6")])
def test_world_sizes_from_the_file_are_bounded_by_the_listing(tmp_path: Path, field: str, value: str) -> None:
    run = copy_fixture(ZERO, tmp_path / "ds")
    states = run / "global_step3" / "mp_rank_00_model_states.pt"
    subprocess.run(
        [sys.executable, "-c", REWRITE_STATES, str(states), field, value], check=True, capture_output=True
    )
    started = time.monotonic()
    result = capped_cli("inspect", str(run), "--json")
    assert time.monotonic() - started < 10
    assert_one_line_error(result, 8, f"{field}={eval(value)}", "the tag holds 3 files")
    data = json.loads(result.stdout)["data"]
    assert len(data["defects"]) == 1 and data["facts"]["zero"]["rank_files"] == {
        "expected": [],
        "missing": [],
    }
    shutil.rmtree(run)


ADAPTER = SHARED_FIXTURES / "lora" / "lora_basic" / "adapter"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank_pattern": {"(": 4}}, "rank_pattern key '(' is not a valid regular expression"),
        ({"rank_pattern": [1, 2]}, "rank_pattern is a list, not an object"),
        ({"target_modules": 5}, "target_modules is an integer, not a list of names or a regex"),
    ],
)
def test_malformed_adapter_config_is_a_defect_of_that_file(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    adapter = copy_fixture(ADAPTER, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    assert_one_line_error(capped_cli("inspect", str(adapter), "--json"), 8, f"adapter_config.json: {message}")


def test_adapter_config_that_is_a_fifo_or_nested_too_deeply(tmp_path: Path) -> None:
    import os

    adapter = copy_fixture(ADAPTER, tmp_path / "adapter")
    (adapter / "adapter_config.json").unlink()
    os.mkfifo(adapter / "adapter_config.json")
    assert_one_line_error(capped_cli("inspect", str(adapter), timeout=20), 8, "not a regular file")
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(capped_cli("inspect", str(adapter)), 8, "adapter_config.json", "nested too deeply")


def test_optimizer_files_of_another_model_fail_verify(tmp_path: Path) -> None:
    """Rank 0's optimizer file swapped for another model's (z2-bf16-untied into z2-bf16-tied-frozen): every file
    is whole, but the fp32 partitions no longer add up to the model's trainable parameters."""
    run = copy_fixture(ZERO, tmp_path / "ds")
    other = SHARED_FIXTURES / "zero" / "z2-bf16-untied" / "checkpoint" / "global_step3"
    name = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shutil.copy(other / name, run / "global_step3" / name)
    assert inspect_checkpoint(str(run)).complete  # names and sizes alone cannot tell
    assert_one_line_error(
        capped_cli("inspect", str(run), "--verify", "--json"),
        8,
        f"global_step3/{name}: optimizer partitions of group 0 hold 1117 elements across 2 ranks",
        "need 803",
    )
