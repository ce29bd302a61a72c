"""``ckptctl inspect`` as users run it: real subprocesses, real files, real S3/GCS servers.

Bad input must give one line on stderr, the documented exit code and no traceback, and must never run code
from a pickle; ``list`` must still list the rest of the run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_without_torch import run_without_torch
from tests.conftest import SHARED_FIXTURES, Backend, run_cli
from tests.formats.torch_files import torch_files

__all__ = ["torch_files"]

ZERO = SHARED_FIXTURES / "zero" / "z2-bf16-tied-frozen" / "checkpoint"
DCP = SHARED_FIXTURES / "dcp" / "torchtitan-fsdp2" / "checkpoint" / "step-3"
SAFETENSORS = SHARED_FIXTURES / "lora" / "bases" / "llama" / "model.safetensors"
TORCH = SHARED_FIXTURES / "lora" / "lora_basic" / "full_state_dict.pt"
ADAPTER = SHARED_FIXTURES / "lora" / "lora_basic" / "adapter"


class _Evil:
    """Unpickling this runs ``touch MARKER`` (the classic pickle payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({"payload": _Evil(marker)}, protocol=protocol)


def evil_torch_file(path: Path, marker: Path) -> None:
    """A torch.save-shaped zip whose data.pkl imports os.system."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{path.stem}/data.pkl", evil_pickle(marker))
        archive.writestr(f"{path.stem}/version", "3\n")


def copy_fixture(source: Path, target: Path) -> Path:
    """A writable copy (the shared fixtures are read-only and must never be changed)."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("hint: ")]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def inspect_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = run_cli("inspect", *args, "--json")
    return result.returncode, json.loads(result.stdout)


# -- what users see ----------------------------------------------------------------------------------------------


def test_human_output_shows_totals_zero_facts_and_tensors() -> None:
    result = run_cli("inspect", str(ZERO))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "deepspeed" in text and "parameters  985 (803 trainable)" in text
    assert "stage                  2" in text and "dp_world_size          2" in text
    assert "lm_head.weight" in text and "param = embed.weight" in text


def test_default_list_is_short_and_filter_selects(tmp_path: Path) -> None:
    result = run_cli("inspect", str(DCP))
    assert "20 of 87 tensors shown" in result.stderr
    code, payload = inspect_json(str(DCP), "--filter", "layers.0.w1.*")
    assert code == 0 and [t["name"] for t in payload["data"]["tensors"]] == [
        "layers.0.w1.weight",
        "layers.0.w1.bias",
    ]
    assert payload["data"]["totals"]["tensors"] == 87  # totals never depend on the filter


def test_json_envelope_carries_the_same_facts() -> None:
    code, payload = inspect_json(str(ADAPTER))
    assert code == 0 and payload["command"] == "inspect" and payload["status"] == "ok"
    data = payload["data"]
    assert set(data) == {
        "url",
        "format",
        "complete",
        "verified",
        "defects",
        "totals",
        "files",
        "tensors",
        "metadata",
        "facts",
        "notes",
    }
    assert data["format"] == "peft" and data["facts"]["peft"]["r"] == 8
    assert data["totals"]["by_dtype"] == {"float32": {"tensors": 28, "elements": 8192, "bytes": 32768}}


def test_run_with_step_and_latest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    copy_fixture(ZERO, run)
    shutil.copytree(run / "global_step3", run / "global_step1")
    code, payload = inspect_json(str(run), "--step", "1")
    assert code == 0 and payload["data"]["facts"]["zero"]["tag"] == "global_step1"
    code, payload = inspect_json(str(run), "--latest")
    assert code == 0 and payload["data"]["url"].endswith("global_step3")
    result = run_cli("inspect", str(run), "--step", "7")
    assert_one_line_error(result, 3, "no checkpoint with step 7")


def test_inspect_never_imports_torch() -> None:
    for target in (ZERO, DCP, TORCH, ADAPTER):
        body, loaded, code = run_without_torch("inspect", str(target), "--json", "--verify")
        assert code in ("0", "None") and not loaded, target
        assert json.loads(body)["data"]["complete"] is True


# -- bad input ---------------------------------------------------------------------------------------------------


def _cut(source: Path, target: Path, length: int) -> Path:
    target.write_bytes(source.read_bytes()[:length])
    return target


def _header_length() -> int:
    return int(struct.unpack("<Q", SAFETENSORS.read_bytes()[:8])[0])


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "model.safetensors")), 8, "too short")
    (tmp_path / "model.pt").write_bytes(b"")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "model.pt")), 8, "too short")


def test_safetensors_cut_in_the_header(tmp_path: Path) -> None:
    path = _cut(SAFETENSORS, tmp_path / "model.safetensors", 8 + _header_length() // 2)
    assert_one_line_error(run_cli("inspect", str(path)), 8, "model.safetensors", "runs past the end")


def test_safetensors_cut_in_the_data_still_lists_its_tensors(tmp_path: Path) -> None:
    path = _cut(SAFETENSORS, tmp_path / "model.safetensors", SAFETENSORS.stat().st_size - 100)
    result = run_cli("inspect", str(path), "--json")
    assert_one_line_error(result, 8, "data cut short", "truncated")
    payload = json.loads(result.stdout)
    assert payload["status"] == "error" and payload["errors"][0]["code"] == "integrity"
    assert payload["data"]["complete"] is False and payload["data"]["totals"]["tensors"] == 21


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1_000_000) + b'{"w": {}}')
    assert_one_line_error(run_cli("inspect", str(path)), 8, "header length 1000000 runs past the end")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "notes.txt")), 3, "not a checkpoint file")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    assert_one_line_error(
        run_cli("inspect", str(tmp_path / "random.pt")), 8, "no zip end-of-central-directory"
    )


def test_zip_without_its_trailer(tmp_path: Path) -> None:
    path = _cut(TORCH, tmp_path / "model.pt", TORCH.stat().st_size - 22)
    assert_one_line_error(run_cli("inspect", str(path)), 8, "no zip end-of-central-directory record")


def test_pickle_importing_os_system_is_refused_and_never_runs(tmp_path: Path) -> None:
    # The payload is live: plain pickle runs it.
    control = tmp_path / "control-marker"
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
        input=evil_pickle(control),
        check=False,
        capture_output=True,
    )
    assert control.exists()
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    evil_torch_file(path, marker)
    result = run_cli("inspect", str(path), "--json")
    assert_one_line_error(result, 8, "refusing to unpickle global posix.system")
    assert json.loads(result.stdout)["errors"][0]["code"] == "unsafe_pickle"
    assert not marker.exists()


def test_dcp_metadata_with_a_payload_is_refused(tmp_path: Path) -> None:
    checkpoint = copy_fixture(DCP, tmp_path / "step-3")
    marker = tmp_path / "MARKER"
    (checkpoint / ".metadata").write_bytes(pickle.dumps((_Evil(marker), "metadata"), protocol=4))
    assert_one_line_error(
        run_cli("inspect", str(checkpoint)), 8, ".metadata", "refusing to unpickle global posix.system"
    )
    assert not marker.exists()


def test_deepspeed_tag_with_a_missing_rank_file(tmp_path: Path) -> None:
    run = copy_fixture(ZERO, tmp_path / "ds")
    (run / "global_step3" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    result = run_cli("inspect", str(run), "--json")
    line = assert_one_line_error(
        result, 8, "global_step3/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank file missing"
    )
    assert "zero_pp_rank_0" not in line
    zero = json.loads(result.stdout)["data"]["facts"]["zero"]
    assert zero["rank_files"]["missing"] == ["global_step3/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_verify_names_a_truncated_rank_file(tmp_path: Path) -> None:
    run = copy_fixture(ZERO, tmp_path / "ds")
    rank = run / "global_step3" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    rank.write_bytes(rank.read_bytes()[:4000])
    assert run_cli("inspect", str(run)).returncode == 0  # the cheap pass only checks names and sizes
    assert_one_line_error(
        run_cli("inspect", str(run), "--verify"), 8, "bf16_zero_pp_rank_1", "end-of-central"
    )


def test_path_that_does_not_exist(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("inspect", str(tmp_path / "nope")), 3, "no such file or folder")


def test_missing_bucket(moto_server: Any) -> None:
    result = run_cli(
        "inspect",
        "s3://no-such-bucket-ckptctl/run/model.safetensors",
        "--storage-option",
        f"endpoint_url={moto_server.endpoint}",
    )
    assert_one_line_error(result, 3, "no such bucket")


def test_list_still_lists_the_rest_of_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(SAFETENSORS, run / "model_step_100.safetensors")
    shutil.copy(TORCH, run / "step_200.pt")
    (run / "step_300.safetensors").write_bytes(b"")
    _cut(SAFETENSORS, run / "step_400.safetensors", 8 + _header_length() // 2)
    _cut(SAFETENSORS, run / "step_500.safetensors", SAFETENSORS.stat().st_size - 100)
    _cut(TORCH, run / "step_600.pt", TORCH.stat().st_size - 22)
    evil_torch_file(run / "step_700.pt", tmp_path / "MARKER")
    (run / "step_800.safetensors").write_bytes(struct.pack("<Q", 1_000_000) + b"{}")
    result = run_cli("list", str(run), "--json", "--settle", "0")
    assert result.returncode == 0, result.stderr
    status = {u["step"]: u["status"] for u in json.loads(result.stdout)["data"]["units"]}
    assert status == {
        100: "complete",
        200: "complete",
        300: "incomplete",
        400: "incomplete",
        500: "incomplete",
        600: "incomplete",
        700: "complete",
        800: "incomplete",
    }
    assert not (tmp_path / "MARKER").exists()


# -- object stores -----------------------------------------------------------------------------------------------


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("url",)}


def test_inspect_reads_the_same_from_every_backend(
    backend: Backend, tmp_path: Path, torch_files: Path
) -> None:
    """In-process (memory:// lives in one process); the CLI over S3/GCS is exercised below."""
    from ckptctl.inspect import inspect_checkpoint

    local = tmp_path / "src"
    copy_fixture(ZERO, local / "ds")
    copy_fixture(DCP, local / "dcp")
    copy_fixture(ADAPTER, local / "adapter")
    shutil.copy(TORCH, local / "model.pt")
    shutil.copy(SAFETENSORS, local / "model.safetensors")
    shutil.copy(torch_files / "tutorial-legacy.pt", local / "legacy.pt")
    shutil.copy(torch_files / "rng_state.pth", local / "rng_state.pth")
    shutil.copy(torch_files / "epoch=2-step=30.ckpt", local / "epoch=2-step=30.ckpt")
    url = backend.put_tree(local, "run")
    for target in (
        "ds",
        "dcp",
        "adapter",
        "model.pt",
        "model.safetensors",
        "legacy.pt",
        "rng_state.pth",
        "epoch=2-step=30.ckpt",
    ):
        remote = inspect_checkpoint(f"{url}/{target}", storage_options=dict(backend.options), verify=True)
        expected = inspect_checkpoint(str(local / target), verify=True)
        assert remote.complete and remote.tensors == expected.tensors, target
        assert _comparable(remote.to_dict()) == _comparable(expected.to_dict())


@pytest.mark.parametrize("name", ["s3", "gcs"])
def test_object_store_header_reads_are_ranged_and_few(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from ckptctl.formats.safetensors_header import read_safetensors_header
    from ckptctl.formats.source import FileSource
    from ckptctl.formats.torch_zip import read_torch_archive
    from tests.conftest import make_backend

    store = make_backend(name, tmp_path, request)
    local = tmp_path / "src"
    local.mkdir()
    shutil.copy(SAFETENSORS, local / "model.safetensors")
    shutil.copy(TORCH, local / "model.pt")
    store.put_tree(local, "run")
    location = store.location("run")
    size = SAFETENSORS.stat().st_size
    source = FileSource(location, "model.safetensors", size)
    assert len(read_safetensors_header(source).tensors) == 21
    assert source.requests == 1 and source.bytes_fetched <= 64 * 1024
    source = FileSource(location, "model.pt", TORCH.stat().st_size)
    assert len(read_torch_archive(source).tensors) == 49
    assert source.requests == 2 and source.bytes_fetched < TORCH.stat().st_size
    result = run_cli("inspect", f"{store.url}/run/model.pt", "--json", *store.cli_options)
    assert result.returncode == 0 and json.loads(result.stdout)["data"]["totals"]["tensors"] == 49


def test_latest_skips_a_half_written_newer_save(tmp_path: Path) -> None:
    from ckptctl.example import write_example_run

    run = write_example_run(tmp_path / "run")
    code, payload = inspect_json(str(run), "--latest")
    assert code == 0 and payload["data"]["url"].endswith("checkpoint-500")


# -- trainers' own files -----------------------------------------------------------------------------------------


def hf_checkpoint(torch_files: Path, folder: Path) -> Path:
    """An HF Trainer ``checkpoint-N/`` of torch-made files (notes/retention-and-layouts.md §7.1)."""
    folder.mkdir(parents=True)
    shutil.copy(SAFETENSORS, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    for source, name in (
        ("optimizer.pt", "optimizer.pt"),
        ("scheduler.pt", "scheduler.pt"),
        ("rng_state.pth", "rng_state_0.pth"),
        ("rng_state-legacy.pth", "rng_state_1.pth"),
        ("training_args.bin", "training_args.bin"),
    ):
        shutil.copy(torch_files / source, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 40, "log_history": []}))
    return folder


def test_verify_checks_every_file_of_a_unit_folder(torch_files: Path, tmp_path: Path) -> None:
    unit = hf_checkpoint(torch_files, tmp_path / "run" / "checkpoint-40")
    code, payload = inspect_json(str(unit), "--verify")
    assert code == 0, payload
    assert payload["data"]["facts"]["verified_files"] == {
        "checked": {
            "config.json": "json",
            "optimizer.pt": "torch zip",
            "rng_state_0.pth": "torch zip",
            "rng_state_1.pth": "torch legacy",
            "scheduler.pt": "torch zip",
            "trainer_state.json": "json",
            "training_args.bin": "torch zip",
        },
        "not_checkable": [],
    }
    assert run_cli("inspect", str(unit)).returncode == 0
    optimizer = (unit / "optimizer.pt").read_bytes()
    (unit / "optimizer.pt").write_bytes(optimizer[: len(optimizer) // 2])
    rng = (unit / "rng_state_1.pth").read_bytes()
    (unit / "rng_state_1.pth").write_bytes(rng[:-10])
    (unit / "trainer_state.json").write_bytes(b"")
    result = run_cli("inspect", str(unit), "--verify", "--json")
    assert_one_line_error(
        result, 8, "checkpoint-40: optimizer.pt: no zip end-of-central-directory record", "2 more"
    )
    defects = json.loads(result.stdout)["data"]["defects"]
    assert [d["file"] for d in defects] == ["optimizer.pt", "rng_state_1.pth", "trainer_state.json"]
    assert "data cut short" in defects[1]["message"] and defects[2]["message"] == "empty file"


def test_optimizer_file_is_not_parameters(torch_files: Path) -> None:
    result = run_cli("inspect", str(torch_files / "optimizer.pt"))
    assert result.returncode == 0, result.stderr
    assert "parameters  0\n" in result.stdout
    assert "optimizer   18 tensors, 494 elements, 1.93 KiB (not counted as parameters)" in result.stdout
    assert "content     optimizer" in result.stdout and "exp_avg, exp_avg_sq, step" in result.stdout


def test_a_folder_of_folders_is_named_not_called_empty(tmp_path: Path) -> None:
    (tmp_path / "step-2" / "sharded").mkdir(parents=True)
    (tmp_path / "step-2" / "sharded" / "notes.txt").write_text("x")
    result = run_cli("inspect", str(tmp_path / "step-2"))
    assert result.returncode == 3
    assert "no checkpoint recognised in this folder (sharded/)" in result.stderr
    (tmp_path / "empty").mkdir()
    assert "(it is empty)" in run_cli("inspect", str(tmp_path / "empty")).stderr
