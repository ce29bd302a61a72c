"""consolidate split over workers (``--workers N --worker-index I``, then ``--finalize``): N real processes at
once against one output folder or one bucket write the same bytes as one process; finalize refuses missing shards
and shards of another plan, naming the worker to rerun; a rerun worker skips what it finished; flags that mean
nothing are usage errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import SHARED_FIXTURES, run_cli

if TYPE_CHECKING:
    from ckptctl.convert.consolidate import ConsolidationResult

FIXTURE = SHARED_FIXTURES / "zero" / "z2-bf16-untied" / "checkpoint"
SIZE = ["--max-shard-size", "1KB"]  # six shards of this fixture, some holding several tensors
INDEX = "model.safetensors.index.json"


@pytest.fixture
def src(tmp_path: Path, shared_fixtures: Path) -> Path:
    """The fixture with a config.json beside it, which only one-process runs and --finalize copy."""
    path = tmp_path / "src"
    shutil.copytree(FIXTURE, path)
    (path / "config.json").write_text('{"model_type": "toy"}')
    return path


def run_workers(src: Path, out: str, workers: int, *args: str, size: list[str] = SIZE) -> list[dict]:
    """Start every worker at once, as a job array does, and return each one's --json data."""
    command = [sys.executable, "-m", "ckptctl", "consolidate", str(src), out, *size, "--json", *args]
    processes = [
        subprocess.Popen(
            [*command, "--workers", str(workers), "--worker-index", str(index)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for index in range(workers)
    ]
    reports = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        reports.append(json.loads(stdout)["data"])
    return reports


def finalize(src: Path, out: str, *args: str, size: list[str] = SIZE) -> subprocess.CompletedProcess[str]:
    return run_cli("consolidate", str(src), out, *size, "--finalize", "--json", *args)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_process(src: Path, out: Path | str, size: str = SIZE[1], **options: Any) -> ConsolidationResult:
    """The core call the CLI makes, in this process: the one-process reference, or a worker or finalize run
    where the test is not about separate processes (each CLI start costs about a second of the budget)."""
    from ckptctl.convert.consolidate import consolidate
    from ckptctl.humanize import parse_size
    from ckptctl.storage import Location

    return consolidate(Location.from_url(str(src)), str(out), max_shard_bytes=parse_size(size), **options)


def reference(src: Path, out: Path) -> dict[str, bytes]:
    one_process(src, out)
    return files_of(out)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *texts: str) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.splitlines()[0]
    assert line.startswith("error: ") and all(text in line for text in texts), line
    return line


def test_three_workers_write_what_one_process_writes(src: Path, tmp_path: Path) -> None:
    expected = reference(src, tmp_path / "single")
    shards = sorted(name for name in expected if name.startswith("model-0"))
    assert len(shards) >= 4 and set(expected) == {*shards, INDEX, "config.json"}
    out = tmp_path / "multi"
    reports = run_workers(src, str(out), 3)
    for index, report in enumerate(reports):
        assert report["shards"]["written"] == shards[index::3] and report["shards"]["skipped"] == []
        assert report["shards"]["mode"] == "worker" and report["shards"]["worker_index"] == index
    assert sorted(files_of(out)) == shards  # workers write neither the index nor the configs
    result = finalize(src, str(out), "--workers", "3")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"]["shards"]["verified"] == shards
    assert files_of(out) == expected
    again = one_process(src, out, finalize=True)  # a requeued finalize finds its own index: rewrites it
    assert again.shards is not None and again.shards.verified == tuple(shards)
    assert files_of(out) == expected


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_three_workers_into_one_bucket(backend, src: Path, tmp_path: Path) -> None:
    expected = reference(src, tmp_path / "single")
    url = f"{backend.url}/hf/"
    run_workers(src, url, 3, *backend.cli_options)
    out = backend.location("hf")
    assert INDEX not in {e.name for e in out.walk()}
    result = one_process(src, url, finalize=True, workers=3, out_options=dict(backend.options))  # in process
    assert result.shards is not None and len(result.shards.verified) == len(expected) - 2
    listed = {e.name for e in out.walk() if e.type == "file"}
    assert listed == set(expected)
    for name, data in expected.items():
        assert out.read_bytes(name, max_bytes=1 << 20) == data, name


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_workers_in_process_on_memory(backend, src: Path, tmp_path: Path) -> None:
    """The core path on another store (memory:// publishes at open): the same bytes, and a rerun skips all."""
    expected = reference(src, tmp_path / "single")
    url, options = f"{backend.url}/hf/", dict(backend.options)
    for index in (2, 0, 1):
        one_process(src, url, workers=3, worker_index=index, out_options=options)
    rerun = one_process(src, url, workers=3, worker_index=1, out_options=options).shards
    assert rerun is not None and rerun.written == () and len(rerun.skipped) == 2
    one_process(src, url, finalize=True, out_options=options)
    out = backend.location("hf")
    assert {e.name: out.read_bytes(e.path) for e in out.walk() if e.type == "file"} == expected


def test_a_missing_shard_is_refused_and_its_worker_resumes(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "multi"
    for index in range(3):  # in process: the concurrent processes are the two tests above
        one_process(src, out, workers=3, worker_index=index)
    shards = sorted(files_of(out))
    lost, kept = shards[4], shards[1]  # both worker 1's
    (out / lost).unlink()
    before = (out / kept).stat().st_mtime_ns
    line = assert_one_line(
        finalize(src, str(out), "--workers", "3"), 4, f"missing: {lost}", "--worker-index 1"
    )
    assert kept not in line and not (out / INDEX).exists() and not (out / "config.json").exists()
    rerun = run_cli(
        "consolidate", str(src), str(out), *SIZE, "--workers", "3", "--worker-index", "1", "--json"
    )
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)["data"]["shards"]
    assert (report["written"], report["skipped"]) == ([lost], [kept])
    assert (out / kept).stat().st_mtime_ns == before
    one_process(src, out, finalize=True)  # --workers is only needed to name whom to rerun
    assert files_of(out) == reference(src, tmp_path / "single")


def test_a_shard_of_another_dtype_is_refused(src: Path, tmp_path: Path) -> None:
    """Every tensor its own shard (``--max-shard-size 1``), so fp32 and bf16 plans name the same files."""
    out = tmp_path / "multi"
    tiny = ["--max-shard-size", "1"]
    for index in range(3):
        one_process(src, out, "1", workers=3, worker_index=index)
    mine = sorted(files_of(out))[2::3]  # worker 2's shards
    before = {name: (out / name).read_bytes() for name in mine}
    worker = [
        "consolidate",
        str(src),
        str(out),
        *tiny,
        "--workers",
        "3",
        "--worker-index",
        "2",
        "--dtype",
        "bf16",
    ]
    assert_one_line(run_cli(*worker), 4, mine[0], "another plan", "pass --force")
    assert {name: (out / name).read_bytes() for name in mine} == before
    one_process(src, out, "1", dtype="bf16", workers=3, worker_index=2, force=True)
    line = assert_one_line(
        finalize(src, str(out), "--workers", "3", size=tiny), 4, mine[0], "another plan", "--worker-index 2"
    )
    assert "--worker-index 0" not in line and not (out / INDEX).exists()
    # The plan fingerprint is what tells them apart: the selection changes it too.
    from ckptctl.convert.selection import Selection

    one_process(src, tmp_path / "sel", "1", selection=Selection.build([], ["embed"], keep_prefix=False))
    assert plan_of(tmp_path / "sel" / "model-00001-of-00012.safetensors") != plan_of(out / mine[0])


def plan_of(path: Path) -> str:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["ckptctl_plan"]


def test_force_removes_only_the_shards_of_an_earlier_count(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    one_process(src, out, "1")
    (out / "model-00001-of-00013.safetensors.bak").write_bytes(b"keep")
    (out / "notes.txt").write_bytes(b"keep")
    os.symlink(out / "notes.txt", out / "model-00099-of-00099.safetensors")
    # Named like a shard, but not ckptctl's (an HF model someone put there: no plan fingerprint): kept.
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (out / "model-00001-of-00002.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4
    )
    result = run_cli("consolidate", str(src), str(out), *SIZE, "--force", "--json")
    assert result.returncode == 0, result.stderr
    removed = json.loads(result.stdout)["data"]["shards"]["removed"]
    assert removed == [f"model-{k:05d}-of-00013.safetensors" for k in range(1, 14)]
    assert set(files_of(out)) == {
        *reference(src, tmp_path / "single"),
        "model-00001-of-00013.safetensors.bak",
        "notes.txt",
        "model-00099-of-00099.safetensors",
        "model-00001-of-00002.safetensors",
    }


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--workers", "3", "--worker-index", "0"], "--workers needs --max-shard-size"),
        ([*SIZE, "--workers", "3", "--worker-index", "3"], "--worker-index 3 is outside 0..2"),
        ([*SIZE, "--worker-index", "0"], "--worker-index needs --workers"),
        ([*SIZE, "--workers", "3", "--worker-index", "1", "--finalize"], "--finalize runs once"),
    ],
)
def test_flags_that_mean_nothing_are_usage_errors(args: list[str], text: str, tmp_path: Path) -> None:
    result = run_cli("consolidate", str(FIXTURE), str(tmp_path / "out"), *args)
    assert_one_line(result, 2, text)
    assert "hint: " in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"workers": 3, "worker_index": -1}, "--worker-index -1 is outside 0..2"),
        ({"workers": 0, "worker_index": 0}, "--workers must be at least 1"),
        ({"workers": 3}, "--workers 3 needs --worker-index I (0..2), or --finalize"),
        ({"finalize": True, "size": None}, "--finalize needs --max-shard-size"),
    ],
)
def test_the_other_combinations_are_usage_errors_before_any_read(
    options: dict, text: str, tmp_path: Path
) -> None:
    """The same check in the core, in process (each CLI start costs a second of the suite's budget)."""
    from ckptctl.convert.consolidate import consolidate
    from ckptctl.errors import UsageError
    from ckptctl.humanize import parse_size
    from ckptctl.storage import Location

    size = options.pop("size", "1KB")
    with pytest.raises(UsageError, match=re.escape(text)):
        consolidate(
            Location.from_url(str(tmp_path / "no-such-src")),
            str(tmp_path / "out"),
            max_shard_bytes=parse_size(size) if size else None,
            **options,
        )
    assert not (tmp_path / "out").exists()
