"""``ckptctl tier``: push, pull and status against local folders, memory://, S3 (moto) and GCS (emulator).

Every check compares bytes with a pristine copy of the run, never with what ckptctl says about itself.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from ckptctl.catalog.scan import scan_run
from ckptctl.errors import RefusedError
from ckptctl.retention.policy import Policy
from ckptctl.storage import Location
from ckptctl.storage.transfer import MiB, digest_local_file
from ckptctl.tiering.manifest import manifest_rel, remote_view
from ckptctl.tiering.pointers import push_pointers
from ckptctl.tiering.pull import pull, pull_run
from ckptctl.tiering.push import PushOptions, push
from ckptctl.tiering.status import tier_status
from tests.conftest import Backend, Server, random_payload, run_cli

STEPS = (100, 200, 300)


def make_run(
    root: Path, steps: tuple[int, ...] = STEPS, size: int = 300_000, incomplete: int | None = 400
) -> Path:
    """HF Trainer checkpoints (weights, optimizer, trainer_state.json) dated an hour ago, plus a half-written one."""
    for index, step in enumerate(steps):
        unit = root / f"checkpoint-{step}"
        unit.mkdir(parents=True)
        (unit / "model.safetensors").write_bytes(random_payload(size))
        (unit / "optimizer.pt").write_bytes(random_payload(size // 3 + index))
        (unit / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    if incomplete is not None:
        unit = root / f"checkpoint-{incomplete}"
        unit.mkdir(parents=True)
        (unit / "model.safetensors").write_bytes(random_payload(size // 2))
    old = time.time() - 3600
    for index, path in enumerate(sorted(root.rglob("*"))):
        os.utime(path, (old + index, old + index))
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".ckptctl")
    }


def remote_bytes(location: Location, rel: str) -> bytes:
    return location.read_bytes(rel)


def test_push_status_pull_round_trip(backend: Backend, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    original = tree(run)
    remote = backend.location("remote")
    local = Location.from_url(str(run))

    result = push(local, remote, PushOptions(settle_seconds=0, jobs=3))

    assert sorted(o.unit.step for o in result.outcomes if o.action == "uploaded") == list(STEPS)
    view = remote_view(remote)
    assert set(view.manifests) == {f"checkpoint-{s}" for s in STEPS}  # never the half-written 400
    assert not remote.exists(manifest_rel("checkpoint-400"))
    for rel, data in original.items():
        if not rel.startswith("checkpoint-400"):
            assert remote_bytes(remote, rel) == data, rel
    expected_state = "verified" if backend.name in ("s3", "gcs") else "size-only"
    rows = {r.path: r for r in tier_status(local, remote, settle_seconds=0)}
    assert {rows[f"checkpoint-{s}"].remote for s in STEPS} == {expected_state}
    assert rows["checkpoint-400"].remote == "-" and rows["checkpoint-400"].where == "local"
    assert {r.remote for r in tier_status(local, remote, reread=True, settle_seconds=0) if r.step != 400} == {
        "verified"
    }

    # A second push uploads nothing.
    again = push(local, remote, PushOptions(settle_seconds=0))
    assert {o.action for o in again.outcomes} == {"already"} and again.uploaded_bytes == 0

    dest = tmp_path / "restored" / "checkpoint-200"
    dest.parent.mkdir()
    pulled = pull(remote, str(dest), step=200)
    assert pulled.manifest.unit == "checkpoint-200"
    assert tree(dest) == {
        k.split("/", 1)[1]: v for k, v in original.items() if k.startswith("checkpoint-200/")
    }
    # Times come back too: the catalog orders and settles checkpoints by them.
    source = run / "checkpoint-200" / "model.safetensors"
    assert abs((dest / "model.safetensors").stat().st_mtime - source.stat().st_mtime) < 1e-3
    assert [p.name for p in dest.parent.iterdir()] == ["checkpoint-200"]


def test_s3_multipart_is_full_object_crc64nvme_and_stale_uploads_are_aborted(
    moto_server: Server, tmp_path: Path
) -> None:
    import s3fs

    backend = make_s3(moto_server)
    run = make_run(tmp_path / "run", steps=(100,), size=12 * MiB, incomplete=None)
    remote = backend.location("remote")
    fs = s3fs.S3FileSystem(endpoint_url=moto_server.endpoint)
    bucket = backend.url.removeprefix("s3://")
    # What a killed push leaves behind: an unfinished multipart upload under the unit.
    stale = fs.call_s3(
        "create_multipart_upload", Bucket=bucket, Key="remote/checkpoint-100/model.safetensors"
    )

    result = push(Location.from_url(str(run)), remote, PushOptions(settle_seconds=0, part_size=5 * MiB))

    assert result.aborted_uploads == 1
    left = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert stale["UploadId"] not in {u["UploadId"] for u in left} and not left
    manifest = remote_view(remote).manifests["checkpoint-100"]
    weights = next(f for f in manifest.files if f.path.endswith("model.safetensors"))
    ours = digest_local_file(str(run / "checkpoint-100" / "model.safetensors")).digest
    assert weights.part_size == 5 * MiB and weights.digest is None and manifest.store_level == "A"
    assert (weights.crc64nvme, weights.crc32c) == (ours.crc64nvme_b64, ours.crc32c_b64)
    head = fs.call_s3(
        "head_object", Bucket=bucket, Key="remote/checkpoint-100/model.safetensors", ChecksumMode="ENABLED"
    )
    # The store holds the whole file's CRC64NVME (FULL_OBJECT), the value the manifest records.
    assert head["ChecksumCRC64NVME"] == weights.crc64nvme and head.get("ChecksumType") == "FULL_OBJECT"
    assert head["ETag"].strip('"') == weights.etag
    dest = tmp_path / "back"
    pull(remote, str(dest), latest=True)
    assert tree(dest) == {k.split("/", 1)[1]: v for k, v in tree(run).items()}


def test_pull_run_restores_the_run_layout_and_leaves_present_checkpoints_alone(
    moto_server: Server, tmp_path: Path
) -> None:
    backend = make_s3(moto_server)
    # 12 MiB weights in 5 MiB parts: pulled as three ranged GETs in parallel, each hashed on its own.
    run = make_run(tmp_path / "run", steps=(100, 200, 300), size=12 * MiB, incomplete=None)
    original = tree(run)
    remote = backend.location("remote")
    push(Location.from_url(str(run)), remote, PushOptions(settle_seconds=0, part_size=5 * MiB))
    restored = tmp_path / "restored"
    (restored / "checkpoint-200").mkdir(parents=True)
    (restored / "checkpoint-200" / "mine.txt").write_text("not from the remote")

    result = pull_run(remote, str(restored), steps=None, jobs=4)

    assert [r.manifest.unit for r in result.pulled] == ["checkpoint-100", "checkpoint-300"]
    assert [m.unit for m, _ in result.present] == ["checkpoint-200"] and not result.failed
    assert tree(restored) == {
        **{k: v for k, v in original.items() if not k.startswith("checkpoint-200/")},
        "checkpoint-200/mine.txt": b"not from the remote",
    }
    assert sorted(p.name for p in restored.iterdir()) == [
        "checkpoint-100",
        "checkpoint-200",
        "checkpoint-300",
    ]
    # Pulled files keep the times they had, so the catalog sees the same order and ages as before.
    assert os.path.getmtime(restored / "checkpoint-300" / "model.safetensors") == os.path.getmtime(
        run / "checkpoint-300" / "model.safetensors"
    )


def test_deepspeed_latest_follows_its_checkpoint_and_comes_back_with_it(
    backend: Backend, shared_fixtures: Path, tmp_path: Path
) -> None:
    """A restored DeepSpeed run resumes only with its ``latest``: it goes up once what it names is tiered, and
    comes back where that checkpoint is restored, never over a pointer the local run already has."""
    saved = shared_fixtures / "zero" / "z2-bf16-untied" / "checkpoint" / "global_step3"
    run = tmp_path / "run"
    for step in (1, 2, 3):
        shutil.copytree(saved, run / f"global_step{step}")
    (run / "latest").write_text("global_step2")  # global_step3 is newer than latest: still being written
    old = time.time() - 3600
    for path in run.rglob("*"):
        os.utime(path, (old, old))
    local, remote = Location.from_url(str(run)), backend.location("remote")

    first = push(local, remote, PushOptions(settle_seconds=0, steps=frozenset({1})))
    assert not first.pointers and not remote.exists("latest")  # global_step2 is not tiered yet
    second = push(local, remote, PushOptions(settle_seconds=0))
    assert [(p.source, p.target) for p in second.pointers] == [("latest", "global_step2")]
    assert remote.read_bytes("latest") == b"global_step2"
    assert set(remote_view(remote).manifests) == {"global_step1", "global_step2"}
    assert not push(local, remote, PushOptions(settle_seconds=0)).pointers  # unchanged: not written again
    (run / "latest").write_text("global_step1")  # rolled back; global_step1 was tiered by the first push
    rolled_back = push(local, remote, PushOptions(settle_seconds=0, steps=frozenset({2})))
    assert [p.target for p in rolled_back.pointers] == ["global_step1"]
    (run / "latest").write_text("global_step2")
    scan = scan_run(local, settle_seconds=0)
    (run / "latest").write_text("global_step3")  # the trainer moves on while the push runs: 3 is not tiered
    assert not push_pointers(local, remote, scan, {"global_step1", "global_step2"}, dry_run=False)
    assert remote.read_bytes("latest") == b"global_step1"
    (run / "latest").write_text("global_step2")
    push(local, remote, PushOptions(settle_seconds=0))

    restored = tmp_path / "restored"
    whole = pull_run(remote, str(restored))
    assert [p.source for p in whole.pointers] == ["latest"] and (
        restored / "latest"
    ).read_text() == "global_step2"
    scan = scan_run(Location.from_url(str(restored)), settle_seconds=0)
    assert [(p.name, p.target) for p in scan.pointers] == [("latest", "global_step2")]
    assert {u.path: u.is_complete for u in scan.units} == {"global_step1": True, "global_step2": True}
    if backend.name != "memory":  # memory:// lives in this process only
        cli = run_cli("tier", "pull", f"{backend.url}/remote", str(tmp_path / "cli"), "--all", "--json",
                      *backend.cli_options)  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["data"]["pointers"] == [{"path": "latest", "target": "global_step2"}]

    only_one = pull_run(remote, str(tmp_path / "one"), steps=frozenset({1}))
    assert not only_one.pointers and not (tmp_path / "one" / "latest").exists()  # it would name a missing tag
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "latest").write_text("global_step1")
    assert not pull_run(remote, str(theirs)).pointers
    assert (theirs / "latest").read_text() == "global_step1"


def test_a_manifest_naming_paths_outside_the_run_is_not_trusted(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(100, 200), incomplete=None)
    remote_root = tmp_path / "remote"
    remote = Location.from_url(str(remote_root))
    push(Location.from_url(str(run)), remote, PushOptions(settle_seconds=0))
    # Someone with write access to the bucket rewrites manifests to make pull write elsewhere.
    for unit, evil in (("checkpoint-100", "checkpoint-100/../../escaped"), ("checkpoint-200", None)):
        path = remote_root / manifest_rel(unit)
        payload = json.loads(path.read_text())
        if evil:
            payload["files"][0]["path"] = evil
        else:
            payload["unit"] = "../escaped-unit"
        path.write_text(json.dumps(payload))

    view = remote_view(remote)

    assert not view.manifests
    assert set(view.bad_manifests) == {manifest_rel("checkpoint-100"), manifest_rel("checkpoint-200")}
    assert all(
        "outside" in bad.error.message or "unsafe" in bad.error.message for bad in view.bad_manifests.values()
    )
    dest = tmp_path / "deep" / "dest"
    dest.parent.mkdir()
    result = pull_run(remote, str(dest), steps=None)  # reported as failures (exit 5), never used
    assert not result.pulled and sorted(b.unit for b in result.corrupt) == [
        "checkpoint-100",
        "checkpoint-200",
    ]
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped-unit").exists()


def make_s3(server: Server) -> Backend:
    import uuid

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bucket-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(endpoint_url=server.endpoint).mkdir(bucket)
    return Backend("s3", f"s3://{bucket}", {"endpoint_url": server.endpoint})


def test_keep_local_frees_only_verified_copies(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(100, 200, 300, 500))
    original = tree(run)
    remote_root = tmp_path / "remote"
    local = Location.from_url(str(run))
    remote = Location.from_url(str(remote_root))
    # 100 is tiered by an earlier push; then its remote copy is damaged (same size, different bytes).
    push(local, remote, PushOptions(settle_seconds=0, steps=frozenset({100})))
    damaged = remote_root / "checkpoint-100" / "optimizer.pt"
    damaged.write_bytes(bytes(len(damaged.read_bytes())))
    # 300 will be refused by the store: a folder where its weights would go.
    (remote_root / "checkpoint-300" / "model.safetensors").mkdir(parents=True)

    result = push(
        local,
        remote,
        PushOptions(
            settle_seconds=0, free_policy=Policy.build(keep_last=1), steps=frozenset({200, 300, 500})
        ),
    )

    assert [o.unit.step for o in result.failed] == [300]
    assert result.freed is not None
    # Only 200: 100's remote copy is corrupt (found by re-reading it: a local folder keeps no checksums), 300
    # failed, 500 is the newest (--keep-local-last 1), 400 is half-written and was never pushed.
    assert [u.path for u in result.freed.deleted] == ["checkpoint-200"]
    reasons = {d.unit.path: d.reasons for d in result.free_plan.decisions}
    assert any("remote copy not verified" in r and "optimizer.pt" in r for r in reasons["checkpoint-100"])
    assert reasons["checkpoint-300"] == ("not tiered",)
    for rel, data in original.items():
        if rel.startswith("checkpoint-200/"):
            assert not (run / rel).exists()
            assert (remote_root / rel).read_bytes() == data
        else:
            assert (run / rel).read_bytes() == data


def test_pull_resumes_from_its_partial_folder(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(100,), size=2_000_000, incomplete=None)
    remote = Location.from_url(str(tmp_path / "remote"))
    push(Location.from_url(str(run)), remote, PushOptions(settle_seconds=0))
    dest = tmp_path / "out" / "checkpoint-100"
    dest.parent.mkdir()
    # What a killed pull leaves: one file whole and verified-to-be, one cut short.
    partial = tmp_path / "out" / ".checkpoint-100.ckptctl-partial"
    partial.mkdir()
    shutil.copy2(run / "checkpoint-100" / "model.safetensors", partial / "model.safetensors")
    (partial / "optimizer.pt").write_bytes((run / "checkpoint-100" / "optimizer.pt").read_bytes()[:1000])

    result = pull(remote, str(dest), step=100)

    assert result.reused_bytes == (run / "checkpoint-100" / "model.safetensors").stat().st_size
    assert tree(dest) == {k.split("/", 1)[1]: v for k, v in tree(run).items()}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["checkpoint-100"]


def test_a_file_rewritten_after_upload_is_uploaded_again_before_its_local_copy_goes(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(100, 200), incomplete=None)
    local, remote = Location.from_url(str(run)), Location.from_url(str(tmp_path / "remote"))
    push(local, remote, PushOptions(settle_seconds=0))
    rewritten = run / "checkpoint-100" / "optimizer.pt"
    new_bytes = random_payload(rewritten.stat().st_size)  # same size: only the time and the bytes tell
    stamp = rewritten.stat().st_mtime - 60  # a new time, still older than checkpoint-200 (prune's time order)
    rewritten.write_bytes(new_bytes)
    os.utime(rewritten, (stamp, stamp))

    result = push(local, remote, PushOptions(settle_seconds=0, free_policy=Policy.build(keep_last=1)))

    assert [o.unit.path for o in result.outcomes if o.action == "uploaded"] == ["checkpoint-100"]
    assert result.freed is not None and [u.path for u in result.freed.deleted] == ["checkpoint-100"]
    assert (tmp_path / "remote" / "checkpoint-100" / "optimizer.pt").read_bytes() == new_bytes


def test_freeing_local_copies_follows_prunes_rules(tmp_path: Path) -> None:
    """issue 16: tier's freeing is prune's plan, so it refuses what prune refuses — here a folder holding two
    runs (two HF output folders), whose steps must never be ranked together. The uploads stand; nothing is freed."""
    root = tmp_path / "outputs"
    make_run(root / "run-a", steps=(100, 200), incomplete=None)
    make_run(root / "run-b", steps=(100, 200), incomplete=None)
    local, remote = Location.from_url(str(root)), Location.from_url(str(tmp_path / "remote"))
    with pytest.raises(RefusedError, match="holds 2 runs"):
        push(local, remote, PushOptions(settle_seconds=0, free_policy=Policy.build(keep_last=1)))
    for run in ("run-a", "run-b"):
        assert sorted(p.name for p in (root / run).iterdir()) == ["checkpoint-100", "checkpoint-200"]
