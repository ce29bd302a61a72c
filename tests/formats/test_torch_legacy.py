"""torch's legacy serialization, read torch-free: the same tensors as torch itself saved, completeness from the
storages' sizes (cut -> incomplete, anything else uncheckable -> unknown, never incomplete), ranged reads that
stay few on S3, and foreign classes that are checked but never run or shown."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptctl.errors import CkptctlError, TruncatedError, UnsafePickleError
from ckptctl.formats.model import Inspection
from ckptctl.formats.quick_check import quick_check_file
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_legacy import LEGACY_MAGIC, read_legacy_torch
from ckptctl.inspect import inspect_checkpoint
from ckptctl.storage.location import Location
from tests.cli.test_without_torch import run_without_torch
from tests.conftest import make_backend, run_cli
from tests.formats.torch_files import manifest, torch_files

__all__ = ["torch_files"]


def source_of(path: Path) -> FileSource:
    return FileSource(Location.from_url(str(path.parent)), path.name, path.stat().st_size)


def quick(path: Path) -> tuple[bool | None, str]:
    check = quick_check_file(Location.from_url(str(path.parent)), path.name, path.stat().st_size)
    return check.ok, check.reason


def rows(result: Inspection) -> list[tuple[str, str, list[int], str, str | None]]:
    return [(t.name, t.dtype, list(t.shape), t.role, t.alias_of) for t in result.tensors]


def test_magic_is_the_pickled_magic_number() -> None:
    assert LEGACY_MAGIC.hex(" ") == "80 02 8a 0a 6c fc 9c 46 f9 20 6a a8 50 19 2e"


@pytest.mark.parametrize(
    "stem", ["weights", "optimizer", "scheduler", "rng_state", "tutorial", "epoch=2-step=30"]
)
def test_legacy_reads_as_torch_saved_it_and_as_the_zip_of_the_same_state(
    torch_files: Path, stem: str
) -> None:
    suffix = ".pth" if stem == "rng_state" else ".ckpt" if stem.startswith("epoch") else ".pt"
    zipped, legacy = torch_files / f"{stem}{suffix}", torch_files / f"{stem}-legacy{suffix}"
    from_zip, from_legacy = inspect_checkpoint(str(zipped)), inspect_checkpoint(str(legacy))
    expected = [(t["name"], t["dtype"], t["shape"]) for t in manifest(torch_files)[legacy.name]["tensors"]]
    assert [(n, d, s) for n, d, s, _, _ in rows(from_legacy)] == expected
    assert rows(from_legacy) == rows(from_zip)
    assert from_legacy.totals() == {**from_zip.totals(), "file_bytes": legacy.stat().st_size}
    assert from_legacy.complete and from_legacy.facts["torch"]["serialization"] == "legacy"
    assert {k: v for k, v in from_legacy.facts.items() if k != "torch"} == {
        k: v for k, v in from_zip.facts.items() if k != "torch"
    }


def test_tensor_offsets_locate_the_bytes_torch_wrote(torch_files: Path) -> None:
    """Streaming readers (convert) find each tensor's bytes at ``tensor_byte_offset``: the sha256 of those bytes
    is the one torch computed from the tensor itself."""
    path = torch_files / "weights-legacy.pt"
    legacy = read_legacy_torch(source_of(path))
    digests = {t["name"]: t["sha256"] for t in manifest(torch_files)[path.name]["tensors"]}
    raw = path.read_bytes()
    assert len(legacy.tensors) == len(digests) == 16
    for record in legacy.tensors:
        start = legacy.tensor_byte_offset(record)
        data = raw[start : start + record.numel * record.itemsize]
        assert hashlib.sha256(data).hexdigest() == digests[record.name], record.name
    assert legacy.aliases == {} and legacy.expected_size == len(raw)


def test_inspect_reads_it_without_torch_and_counts_no_optimizer_state(torch_files: Path) -> None:
    body, loaded, code = run_without_torch(
        "inspect", str(torch_files / "tutorial-legacy.pt"), "--json", "--verify"
    )
    assert code in ("0", "None") and not loaded
    data = json.loads(body)["data"]
    assert data["totals"]["parameters"] == manifest(torch_files)["tutorial-legacy.pt"]["model_parameters"]
    assert data["facts"]["content"] == "training_state" and data["metadata"]["step"] == 3


def test_sizes_decide_completeness(torch_files: Path, tmp_path: Path) -> None:
    original = torch_files / "weights-legacy.pt"
    raw = original.read_bytes()
    data_start = read_legacy_torch(source_of(original)).data_start
    path = tmp_path / "step_1.pt"

    path.write_bytes(raw)
    assert quick(path) == (True, "legacy torch file: its storages end exactly at the end of the file")

    path.write_bytes(raw[:-3])  # cut in the last storage's data
    ok, reason = quick(path)
    assert ok is False and reason.startswith("data cut short") and "(truncated)" in reason
    result = inspect_checkpoint(str(path))
    assert not result.complete and [d.truncated for d in result.defects] == [True]

    path.write_bytes(raw[: data_start - 5])  # cut in the pickled list of storage keys
    assert quick(path)[0] is False
    with pytest.raises(TruncatedError, match="ends inside its pickles"):
        inspect_checkpoint(str(path))

    path.write_bytes(raw[:9])  # cut inside the magic number
    assert quick(path)[0] is False

    path.write_bytes(raw + b"\0" * 10)  # torch.load ignores trailing bytes: not whole, not cut either
    assert quick(path) == (None, "legacy torch file with 10 bytes after its last storage")
    assert inspect_checkpoint(str(path)).complete


def test_a_wrong_storage_count_is_damage_not_truncation(torch_files: Path, tmp_path: Path) -> None:
    legacy = read_legacy_torch(source_of(torch_files / "weights-legacy.pt"))
    raw = bytearray((torch_files / "weights-legacy.pt").read_bytes())
    first = legacy.storages[0]
    raw[first.count_offset : first.data_offset] = struct.pack("<q", first.numel + 1)
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(raw))
    ok, reason = quick(path)  # a small file: its counts were fetched with the pickles, so they are checked
    assert ok is None and "counts" in reason
    for cut in (len(raw) - 1, first.data_offset + 1):  # short as well: still not provably cut
        path.write_bytes(bytes(raw[:cut]))
        assert quick(path)[0] is None


def test_verify_reads_every_count_of_a_large_file(torch_files: Path, tmp_path: Path) -> None:
    original = torch_files / "large-legacy.pt"
    legacy = read_legacy_torch(source_of(original))
    last = legacy.storages[-1]
    raw = bytearray(original.read_bytes())
    raw[last.count_offset : last.data_offset] = struct.pack("<q", 7)
    path = tmp_path / "large.pt"
    path.write_bytes(bytes(raw))
    assert quick(path)[0] is True  # the size matches; the count lies beyond the bytes a quick check reads
    assert inspect_checkpoint(str(path)).complete
    defects = inspect_checkpoint(str(path), verify=True).defects
    assert [str(d) for d in defects] == [
        f"large.pt: storage {last.key}: the file counts 7 elements, the pickle {last.numel} (corrupt)"
    ]
    result = run_cli("inspect", str(path), "--verify")
    assert result.returncode == 8 and "the file counts 7 elements" in result.stderr


def test_not_a_torch_file_is_unknown_never_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "step_5.pt"
    path.write_bytes(b"just some text that happens to be named .pt\n" * 100)
    assert quick(path) == (None, "not a torch zip or legacy file")
    path.write_bytes(b"")
    assert quick(path) == (False, "empty file")


def test_foreign_classes_are_checked_but_never_run_or_shown(torch_files: Path, tmp_path: Path) -> None:
    """A whole ``nn.Module`` (``torch.save(model)``) and an object whose unpickling runs ``touch MARKER``:
    list's check walks them (their classes become inert records), inspect refuses to show them, and the
    payload never runs."""
    module = torch_files / "module-legacy.pt"
    assert quick(module)[0] is True
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.container\.Sequential"):
        inspect_checkpoint(str(module))
    for name in ("evil-legacy.pt", "evil.pt"):
        assert quick(torch_files / name)[0] is True
        with pytest.raises(UnsafePickleError, match=r"posix\.system"):
            inspect_checkpoint(str(torch_files / name))
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    shutil.copy(torch_files / "weights.pt", folder / "pytorch_model.bin")
    shutil.copy(torch_files / "evil-legacy.pt", folder / "extra.pt")
    shutil.copy(torch_files / "training_args-legacy.bin", folder / "training_args.bin")
    result = inspect_checkpoint(str(folder), verify=True)
    assert result.complete and result.facts["verified_files"]["checked"] == {
        "extra.pt": "torch legacy",
        "training_args.bin": "torch legacy",
    }
    assert not (torch_files / "MARKER").exists()


def test_pickle_protocol_4(torch_files: Path) -> None:
    result = inspect_checkpoint(str(torch_files / "proto4-legacy.pt"), verify=True)
    assert rows(result) == [("a", "float32", [3], "param", None)] and result.complete


def test_a_large_pickle_costs_one_more_read(torch_files: Path) -> None:
    source = source_of(torch_files / "many-legacy.pt")
    legacy = read_legacy_torch(source)
    assert len(legacy.tensors) == 3000 and legacy.data_start > 64 * 1024
    assert source.requests == 2  # the first 64 KiB, then the rest of the pickles in one read
    assert legacy.check() == [] and source.requests == 2


def test_legacy_on_s3_with_few_ranged_reads(
    torch_files: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = make_backend("s3", tmp_path, request)
    local = tmp_path / "src"
    local.mkdir()
    for name in ("large-legacy.pt", "weights-legacy.pt"):
        shutil.copy(torch_files / name, local / name)
    store.put_tree(local, "run")
    location = store.location("run")
    size = (local / "large-legacy.pt").stat().st_size
    source = FileSource(location, "large-legacy.pt", size)
    legacy = read_legacy_torch(source)
    assert [t.shape for t in legacy.tensors] == [(100_000,)] * 3 and legacy.check() == []
    assert source.requests == 1 and source.bytes_fetched == 64 * 1024
    # One read per count 400 KB apart; the first count came with the pickles.
    assert legacy.check("all") == [] and source.requests == 1 + 2
    check = quick_check_file(location, "large-legacy.pt", size)
    assert check.ok is True
    result = run_cli(
        "inspect", f"{store.url}/run/weights-legacy.pt", "--json", "--verify", *store.cli_options
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    local_data = inspect_checkpoint(str(local / "weights-legacy.pt"), verify=True).to_dict()
    assert data["tensors"] == local_data["tensors"] and data["totals"] == local_data["totals"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_legacy_files_never_raise_anything_but_ckptctl_errors(
    torch_files: Path, tmp_path: Path, data: st.DataObject
) -> None:
    """Whatever bytes of a legacy file change (most flips land in its pickles), inspect reads it or raises a
    CkptctlError, and the quick check returns a verdict: never a traceback."""
    raw = bytearray((torch_files / "tutorial-legacy.pt").read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        limit = data.draw(st.sampled_from([2000, len(raw)]))
        raw[data.draw(st.integers(0, limit - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(raw))
    with contextlib.suppress(CkptctlError):
        inspect_checkpoint(str(path), verify=True)
    assert quick(path)[0] in (True, False, None)
