"""Remote manifests are remote input (issue 15): every field is checked once, in ``Manifest.decode``, and a
manifest that fails makes its checkpoint corrupt everywhere: ``status`` and ``pull --step`` exit 8, ``pull
--all`` reports it as a failure (exit 5), and nothing is written for it. Against real stores (local, memory://,
moto S3, the GCS emulator), never a mock.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckptctl.errors import IntegrityError
from ckptctl.storage import Location
from ckptctl.storage.transfer import MiB
from ckptctl.tiering.manifest import (
    MANIFEST_DIR,
    Manifest,
    ManifestFile,
    manifest_rel,
    remote_view,
    unit_of_manifest,
)
from ckptctl.tiering.pull import pull, pull_run
from ckptctl.tiering.push import PushOptions, push
from ckptctl.tiering.status import tier_status
from tests.conftest import Backend, random_payload, run_cli

NAME = "s3://bucket/run/.ckptctl-tier/checkpoint-60.json"


def valid_payload() -> dict[str, Any]:
    manifest = Manifest(
        unit="checkpoint-60",
        kind="dir",
        step=60,
        layout="hf-trainer",
        files=(
            ManifestFile("checkpoint-60/model.safetensors", 40 * MiB, "0" * 32 + "-3", 16 * MiB, 1.7e9),
            ManifestFile("checkpoint-60/trainer_state.json", 120, "a" * 32, None, None),
        ),
        source="/nvme/run",
        created=1.7e9,
    )
    payload: dict[str, Any] = json.loads(manifest.encode())
    return payload


def each_file(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda payload: [entry.update(fields) for entry in payload["files"]] and None


def first_file(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload["files"][0].update(fields)


def top(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda payload: payload.update(fields)


# (edit of a valid payload, what the error must name)
HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "part-size-zero": (first_file(part_size=0), "part_size"),
    "part-size-below-5mib": (first_file(part_size=5 * MiB - 1), "part_size"),
    "part-size-over-5gib": (first_file(part_size=5 * 1024 * MiB + 1), "part_size"),
    "part-size-a-bool": (first_file(part_size=True), "part_size"),
    "too-many-parts": (first_file(size=10_001 * 5 * MiB, part_size=5 * MiB), "parts"),
    "mtime-1e300": (each_file(mtime=1e300), "mtime"),
    "mtime-nan": (each_file(mtime=math.nan), "mtime"),
    "mtime-a-string": (each_file(mtime="yesterday"), "mtime"),
    "mode-setuid": (each_file(mode=0o4755), "mode"),
    "mode-a-string": (each_file(mode="rwx"), "mode"),
    "mode-negative": (each_file(mode=-1), "mode"),
    "created-infinite": (top(created=math.inf), "created"),
    "step-a-string": (top(step="sixty"), "step"),
    "step-negative": (top(step=-1), "step"),
    "step-a-bool": (top(step=True), "step"),
    "step-past-int64": (top(step=2**64), "step"),
    "size-a-string": (each_file(size="big"), "size"),
    "size-negative": (first_file(size=-1), "size"),
    "digest-not-md5": (first_file(digest="<script>"), "digest"),
    "path-a-number": (first_file(path=5), "path"),
    "path-unsafe": (each_file(path="../../outside/victim.txt"), "unsafe path"),
    "path-nul": (first_file(path="checkpoint-60/a\x00b"), "unsafe path"),
    "path-outside-unit": (first_file(path="checkpoint-70/model.safetensors"), "outside its checkpoint"),
    "path-twice": (lambda p: p["files"].append(dict(p["files"][0])), "twice"),
    "files-empty": (top(files=[]), "files"),
    "files-an-object": (top(files={}), "files"),
    "file-a-list": (lambda p: p["files"].__setitem__(0, [1, 2]), "files[0]"),
    "unit-a-list": (top(unit=["x"]), "unit"),
    "kind-unknown": (top(kind="tarball"), "kind"),
    "version-a-bool": (top(ckptctl_manifest_version=True), "version"),
    "total-bytes-wrong": (top(total_bytes=1), "total_bytes"),
}


def test_the_valid_manifest_round_trips() -> None:
    payload = valid_payload()
    manifest = Manifest.decode(json.dumps(payload).encode(), name=NAME)
    assert manifest.step == 60 and manifest.files[0].part_size == 16 * MiB and manifest.files[1].mtime is None
    assert Manifest.decode(manifest.encode()) == manifest


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_decode_refuses_a_field_of_the_wrong_type_or_range(case: str) -> None:
    edit, field = HOSTILE[case]
    payload = valid_payload()
    edit(payload)
    with pytest.raises(IntegrityError) as caught:
        Manifest.decode(json.dumps(payload).encode(), name=NAME)
    assert caught.value.message.startswith(NAME) and field in caught.value.message, caught.value.message
    assert caught.value.exit_code == 8


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"ckptctl_manifest_version": 1, "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"\xff\xfe not utf-8",
        b"{",
        b"",
    ],
    ids=["deep", "deep-value", "not-utf8", "cut", "empty"],
)
def test_decode_refuses_what_is_not_a_json_manifest(data: bytes) -> None:
    with pytest.raises(IntegrityError) as caught:
        Manifest.decode(data, name=NAME)
    assert caught.value.message.startswith(NAME)


def test_the_unit_of_a_manifest_comes_from_its_name() -> None:
    for unit in ("checkpoint-60", "step_10.pt", "x[/]step_70.pt", "runs/a b/c", ""):
        assert unit_of_manifest(manifest_rel(unit)) == unit
    assert unit_of_manifest(f"{MANIFEST_DIR}/..%2Fescape.json") is None
    assert unit_of_manifest(f"{MANIFEST_DIR}/sub/x.json") is None


def make_run(root: Path, steps: tuple[int, ...] = (100, 200, 300)) -> Path:
    for step in steps:
        unit = root / f"checkpoint-{step}"
        unit.mkdir(parents=True)
        (unit / "model.safetensors").write_bytes(random_payload(40_000 + step))
        (unit / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    old = time.time() - 3600
    for index, path in enumerate(sorted(root.rglob("*"))):
        os.utime(path, (old + index, old + index))
    return root


def corrupt(remote: Location, unit: str, edit: Callable[[dict[str, Any]], None] | bytes) -> None:
    rel = manifest_rel(unit)
    if isinstance(edit, bytes):
        data = edit
    else:
        payload = json.loads(remote.read_bytes(rel))
        edit(payload)
        data = json.dumps(payload).encode()
    remote.write_bytes(rel, data)


def test_a_corrupt_manifest_is_a_corrupt_checkpoint_everywhere(backend: Backend, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    local, remote = Location.from_url(str(run)), backend.location("remote")
    push(local, remote, PushOptions(settle_seconds=0))
    # part_size 0 made status --verify loop with growing memory; a string step crashed the status sort.
    corrupt(remote, "checkpoint-100", each_file(part_size=0))
    corrupt(remote, "checkpoint-200", top(step="sixty"))

    rows = {r.path: r for r in tier_status(local, remote, reread=True, settle_seconds=0)}
    assert {p: r.remote for p, r in rows.items()} == {
        "checkpoint-100": "corrupt",
        "checkpoint-200": "corrupt",
        "checkpoint-300": "verified",
    }
    assert "part_size" in rows["checkpoint-100"].problems[0] and rows["checkpoint-100"].where == "local"
    assert rows["checkpoint-200"].step == 200  # the local one: the remote step is not trusted

    dest = tmp_path / "one"
    with pytest.raises(IntegrityError, match="part_size"):
        pull(remote, str(dest), step=100)
    # Step 999 is in no valid manifest, but the one whose step cannot be read may be it: corrupt, not "not tiered".
    with pytest.raises(IntegrityError, match="may be checkpoint-200"):
        pull(remote, str(dest), step=999)
    with pytest.raises(IntegrityError):
        pull(remote, str(dest), latest=True)
    assert not os.path.lexists(dest) and not list(tmp_path.glob(".*ckptctl-partial"))
    assert pull(remote, str(dest), step=300).manifest.unit == "checkpoint-300"

    restored = tmp_path / "restored"
    result = pull_run(remote, str(restored))
    assert [r.manifest.unit for r in result.pulled] == ["checkpoint-300"]
    assert sorted(b.shown for b in result.corrupt) == ["checkpoint-100", "checkpoint-200"]
    assert sorted(os.listdir(restored)) == ["checkpoint-300"]

    if backend.name != "memory":  # memory:// lives in this process only
        options = backend.cli_options
        status = run_cli("tier", "status", str(run), "--remote", remote.url, "--verify", *options, timeout=60)
        assert status.returncode == 8, status.stderr
        assert status.stderr.count("error:") == 1 and "Traceback" not in status.stderr
        step = run_cli(
            "tier", "pull", remote.url, str(tmp_path / "cli"), "--step", "100", *options, timeout=60
        )
        assert step.returncode == 8 and "corrupt" in step.stderr, step.stderr
        every = run_cli(
            "tier", "pull", remote.url, str(tmp_path / "all"), "--all", "--json", *options, timeout=60
        )
        assert every.returncode == 5, every.stderr
        failed = json.loads(every.stdout.splitlines()[-1])["errors"]
        assert sorted(f["unit"] for f in failed) == ["checkpoint-100", "checkpoint-200"]

    # A push rewrites what it finds corrupt: afterwards every checkpoint is tiered again.
    again = push(local, remote, PushOptions(settle_seconds=0))
    assert sorted(o.unit.path for o in again.outcomes if o.action == "uploaded") == [
        "checkpoint-100",
        "checkpoint-200",
    ]
    assert not remote_view(remote).bad_manifests


@pytest.mark.parametrize(
    "edit",
    [
        each_file(mtime=1e300),  # was an OverflowError traceback from os.utime, after downloading everything
        each_file(path="../../outside/victim.txt"),  # was "not tiered" (exit 3)
        b'{"ckptctl_manifest_version": 1, "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["mtime-1e300", "unsafe-path", "deep-nesting"],
)
def test_pull_of_a_corrupt_manifest_writes_nothing(edit: Any, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(60,))
    remote = Location.from_url(str(tmp_path / "remote"))
    push(Location.from_url(str(run)), remote, PushOptions(settle_seconds=0))
    corrupt(remote, "checkpoint-60", edit)
    out = tmp_path / "out"
    out.mkdir()
    cli = run_cli("tier", "pull", remote.url, str(out / "pulled"), "--step", "60", timeout=60)
    assert cli.returncode == 8, cli.stderr
    assert cli.stderr.startswith("error: step 60 ") and "Traceback" not in cli.stderr
    assert not os.listdir(out) and not (tmp_path / "outside").exists()


def test_push_records_a_file_time_no_manifest_may_hold_as_unknown(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(60,))
    far = run / "checkpoint-60" / "model.safetensors"
    os.utime(
        far, (2**34, 2**34)
    )  # past 2242 (ext4 stores up to 2446): on the disk, but refused in a manifest
    local, remote = Location.from_url(str(run)), Location.from_url(str(tmp_path / "remote"))
    push(local, remote, PushOptions(settle_seconds=0))
    manifest = remote_view(remote).manifests["checkpoint-60"]
    assert {f.path: f.mtime for f in manifest.files}["checkpoint-60/model.safetensors"] is None
    again = push(local, remote, PushOptions(settle_seconds=0))
    assert [o.action for o in again.outcomes] == ["already"]  # the unknown time is not a change
