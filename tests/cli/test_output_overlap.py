"""Commands that write, run as the real CLI: an output that is, contains or lies inside an input is refused before
anything is written; a full disk is one line with the partial output gone; outputs get the umask's modes; prune
leaves no lock file and never writes through a link where its lock goes (issues 15, 16 and 14 item 12).

Every case checks the inputs byte for byte afterwards (hashes of every entry, hidden ones and links included).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_FIXTURES, Backend, make_backend, run_cli
from tests.snapshots import snapshot

ZERO = SHARED_FIXTURES / "zero" / "z2-bf16-untied" / "checkpoint"
LORA = SHARED_FIXTURES / "lora" / "lora_basic"


def one_error_line(stderr: str) -> str:
    """The ``error:`` line of a refused or failed command; fails on a traceback or any other stderr output."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), stderr
    return lines[0]


def run_limited(
    *args: str, fsize: int | None = None, umask: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess under a file-size limit (writes past it fail with EFBIG, as on a full disk) and/or
    a umask."""

    def setup() -> None:
        if umask is not None:
            os.umask(umask)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "ckptctl", *args],
        capture_output=True,
        text=True,
        preexec_fn=setup,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.fixture
def ds(tmp_path: Path, shared_fixtures: Path) -> Path:
    target = tmp_path / "ds"
    shutil.copytree(ZERO, target)
    return target


@pytest.fixture
def ck(tmp_path: Path, shared_fixtures: Path) -> Path:
    target = tmp_path / "ck"
    target.mkdir()
    for name in ("full_state_dict.safetensors", "full_state_dict.pt"):
        shutil.copy(LORA / name, target / name)
    shutil.copytree(LORA / "deepspeed_zero2", target / "deepspeed_zero2")
    shutil.copytree(LORA / "merged", target / "merged")
    return target


# -- consolidate ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("out", "words"),
    [
        ("ds/global_step3/mp_rank_00_model_states.pt", "lies inside"),  # overwrites a rank file today
        ("ds/", "is the same place as"),
        ("ds/global_step3/", "lies inside"),
        (".", "contains"),
        ("via-link/model.safetensors", "lies inside"),
    ],
)
def test_consolidate_refuses_an_out_that_overlaps_src(
    ds: Path, tmp_path: Path, out: str, words: str, monkeypatch
) -> None:
    (tmp_path / "via-link").symlink_to(ds)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("consolidate", "ds", out, "--force")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"OUT {out.rstrip('/') or out}" in line and words in line and "SRC ds" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_consolidate_refuses_an_out_inside_a_remote_src(
    store: str, tmp_path: Path, request, shared_fixtures: Path
) -> None:
    backend: Backend = make_backend(store, tmp_path, request)
    url = backend.put_tree(ZERO, "ds")
    before = {e.path: (e.size, e.etag, e.checksum) for e in backend.location("ds").walk()}
    result = run_cli(
        "consolidate", url, f"{url}/global_step3/mp_rank_00_model_states.pt", "--force", *backend.cli_options
    )
    assert result.returncode == 2 and "lies inside SRC" in one_error_line(result.stderr)
    assert {e.path: (e.size, e.etag, e.checksum) for e in backend.location("ds").walk()} == before


def test_consolidate_output_gets_the_umask_mode(ds: Path, tmp_path: Path) -> None:
    (ds / "config.json").write_text("{}")
    result = run_limited("consolidate", str(ds), str(tmp_path / "out") + "/", umask=0o027)
    assert result.returncode == 0, result.stderr
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o640, name
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("sharded", [False, True])
def test_consolidate_on_a_full_disk_is_one_line_and_leaves_nothing(
    ds: Path, tmp_path: Path, sharded: bool
) -> None:
    before = snapshot(ds)
    out = tmp_path / "out"
    if sharded:
        # 1 KB shards: the first (412 bytes) fits under the limit and is written, the second (1,888) does not.
        result = run_limited("consolidate", str(ds), str(out), "--max-shard-size", "1KB", fsize=1000)
    else:
        result = run_limited("consolidate", str(ds), str(out / "model.safetensors"), fsize=4096)
    assert result.returncode == 1
    assert one_error_line(result.stderr).startswith("error: no space left while writing ")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert snapshot(ds) == before


# -- extract-lora ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("src", "out", "words"),
    [
        ("ck/full_state_dict.safetensors", "ck", "contains"),  # --force deletes the state dict today
        ("ck/deepspeed_zero2", "ck/deepspeed_zero2/adapter", "lies inside"),
        ("ck/full_state_dict.pt", "ck/full_state_dict.pt", "is the same place as"),
        ("ck/full_state_dict.safetensors", "alias", "contains"),  # a link to ck
    ],
)
def test_extract_lora_refuses_an_out_dir_that_overlaps_src(
    ck: Path, tmp_path: Path, src: str, out: str, words: str, monkeypatch
) -> None:
    (tmp_path / "alias").symlink_to(ck)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("extract-lora", src, out, "--alpha", "8", "--force")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"OUT_DIR {out} {words} SRC {src}" in line
    assert snapshot(tmp_path) == before


def test_extract_lora_svd_refuses_an_out_dir_inside_base_or_tuned(ck: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    merged = str(ck / "merged")
    for flag in ("--base", "--tuned"):
        other = "--tuned" if flag == "--base" else "--base"
        result = run_cli("extract-lora", flag, merged, other, str(ck / "deepspeed_zero2"), f"{merged}/adapter",
                         "--rank", "2", "--force")  # fmt: skip
        assert result.returncode == 2 and f"lies inside {flag}" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_extract_lora_output_gets_the_umask_mode(ck: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = run_limited(
        "extract-lora", str(ck / "full_state_dict.pt"), str(out), "--alpha", "8", umask=0o027
    )
    assert result.returncode == 0, result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    assert out.stat().st_mode & 0o777 == 0o750


def test_extract_lora_on_a_full_disk_is_one_line_and_leaves_nothing(ck: Path, tmp_path: Path) -> None:
    before = snapshot(ck)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "old.txt").write_text("the previous adapter")  # --force must keep it on failure
    result = run_limited(
        "extract-lora", str(ck / "full_state_dict.pt"), str(tmp_path / "adapter"), "--alpha", "8", "--force",
        fsize=4096,
    )  # fmt: skip
    assert result.returncode == 1
    assert one_error_line(result.stderr).startswith(
        f"error: no space left while writing {tmp_path / 'adapter'}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ck"]
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["old.txt"]
    assert snapshot(ck) == before


def test_extract_lora_never_writes_through_a_partial_folder_link(ck: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "adapter_model.safetensors").write_bytes(b"someone else's")
    (tmp_path / ".adapter.ckptctl-partial").symlink_to(victim)
    before = snapshot(tmp_path)
    result = run_cli(
        "extract-lora", str(ck / "full_state_dict.pt"), str(tmp_path / "adapter"), "--alpha", "8"
    )
    assert result.returncode == 4 and "symbolic link" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before


# -- every command: a full disk is one line ------------------------------------------------------------------
def test_a_full_disk_is_one_line_for_any_command(tmp_path: Path) -> None:
    result = run_limited("example", str(tmp_path / "run"), fsize=100)
    assert result.returncode == 1
    assert one_error_line(result.stderr).startswith("error: no space left")


# -- prune and the run lock -------------------------------------------------------------------------------------
def test_prune_leaves_no_lock_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("example", str(run)).returncode == 0
    result = run_cli("prune", str(run), "--keep-last", "2", "--yes")
    assert result.returncode == 0, result.stderr
    assert not (run / ".ckptctl.lock").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".ckptctl")]


def test_prune_never_writes_through_a_lock_link(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("example", str(run)).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not a lock")
    (run / ".ckptctl.lock").symlink_to(victim)
    before = snapshot(tmp_path)
    result = run_cli("prune", str(run), "--keep-last", "1", "--yes")
    assert result.returncode == 4 and ".ckptctl.lock is a symbolic link" in one_error_line(result.stderr)
    assert snapshot(tmp_path) == before
