"""consolidate with OUT on an object store: streamed multipart uploads (no local copy), an aborted upload never
published, the index last, an existing OUT refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED_FIXTURES, run_cli

SRC = SHARED_FIXTURES / "zero" / "z2-bf16-untied" / "checkpoint"


@pytest.mark.parametrize("backend", ["memory", "s3", "gcs"], indirect=True)
def test_streamed_shards_match_local_output(backend, tmp_path: Path, shared_fixtures: Path) -> None:
    import shutil

    from ckptctl.convert.consolidate import consolidate
    from ckptctl.storage import Location

    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    (src / "config.json").write_text('{"model_type": "toy"}')  # copied beside the output, on both paths
    local = tmp_path / "local"
    consolidate(Location.from_url(str(src)), str(local), max_shard_bytes=1000)
    assert (local / "config.json").read_text() == '{"model_type": "toy"}'
    remote = consolidate(
        Location.from_url(str(src)),
        f"{backend.url}/out/",
        max_shard_bytes=1000,
        out_options=dict(backend.options),
    )
    assert remote.output.endswith("out/model.safetensors.index.json")
    out = backend.location("out")
    names = sorted(p.name for p in local.iterdir())
    assert len(names) > 2
    assert sorted(e.name for e in out.walk() if e.type == "file") == names
    for name in names:
        assert out.read_bytes(name, max_bytes=1 << 30) == (local / name).read_bytes(), name


@pytest.mark.parametrize("backend", ["memory", "s3"], indirect=True)  # gcs: see the note in the report
def test_a_failed_object_is_never_published(backend) -> None:
    """Several parts sent, then an exception: the multipart upload is aborted, no object under the name."""
    from ckptctl.storage.atomic import new_object

    location = backend.location()
    path = location.full_path("big.safetensors")
    part = 5 * 1024 * 1024 if backend.name == "s3" else 256 * 1024  # the smallest part each store takes
    with pytest.raises(RuntimeError), new_object(location.fs, path, part_bytes=part) as handle:
        for _ in range(3):
            handle.write(b"x" * (part // 2 + 1))
        raise RuntimeError("disk died")
    location.fs.invalidate_cache()
    assert not location.fs.exists(path)
    with new_object(location.fs, path) as handle:
        handle.write(b"done")
    location.fs.invalidate_cache()
    assert location.fs.cat_file(path) == b"done"


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_a_killed_writer_leaves_no_object(backend) -> None:
    """kill -9 after two 5 MiB parts were uploaded: the upload was never completed, so nothing is visible."""
    location = backend.location()
    script = textwrap.dedent(
        f"""
        import sys, time, s3fs
        from ckptctl.storage.atomic import new_object
        fs = s3fs.S3FileSystem(endpoint_url={backend.options["endpoint_url"]!r})
        with new_object(fs, {location.full_path("killed.safetensors")!r}, part_bytes=5 * 1024 * 1024) as h:
            h.write(b"y" * (11 * 1024 * 1024))
            print("parts sent", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "parts sent"
        process.kill()
    finally:
        process.wait(10)
    time.sleep(0.2)
    location.fs.invalidate_cache()
    assert not location.fs.exists(location.full_path("killed.safetensors"))
    uploads = location.fs.call_s3("list_multipart_uploads", Bucket=location.root.split("/")[0])
    assert len(uploads.get("Uploads", [])) == 1  # left for the bucket's abort-incomplete-uploads rule


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_existing_out_refused_before_any_work(backend) -> None:
    location = backend.location("out")
    location.write_bytes("model.safetensors.index.json", b"{}")
    result = run_cli(
        "consolidate", str(SRC), f"{backend.url}/out/", "--max-shard-size", "1KB", *backend.cli_options
    )
    assert result.returncode != 0 and "exists; pass --force" in result.stderr
    assert sorted(e.name for e in location.walk()) == ["model.safetensors.index.json"]
    forced = run_cli(
        "consolidate",
        str(SRC),
        f"{backend.url}/out/",
        "--max-shard-size",
        "1KB",
        "--force",
        *backend.cli_options,
    )
    assert forced.returncode == 0, forced.stderr
    assert json.loads(location.read_bytes("model.safetensors.index.json"))["weight_map"]
