"""A push killed in the middle of a large file's multipart upload resumes it (issue 18): the parts already on the
store are checked against the local bytes and not sent again; an upload of a file that changed since, with
another part size, or that this tool did not record as its own, is aborted and started over.

Kills are real ``SIGKILL``s of a push in a subprocess, either at an exact point (after N parts, from the push's own
byte callback) or at a random moment while the parts go up; UploadPart requests are counted in moto's request log.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptctl.storage import Location
from ckptctl.storage.s3_data import upload_records_dir
from ckptctl.tiering.manifest import check_manifest, remote_view
from tests.conftest import Server, run_cli
from tests.tiering.s3_stub import s3_stub
from tests.tiering.test_tier import make_run, make_s3, tree

MiB = 2**20
PART = 5 * MiB
MODEL = "checkpoint-100/model.safetensors"
SIZE = 4 * PART + 3 * MiB  # 5 parts
PARTS = 5

# Push from a subprocess and kill it (SIGKILL, no clean-up runs) once ``after`` bytes are uploaded; jobs=1 sends
# the parts in order, so exactly after//PART parts of the first file are on the store.
KILLED_PUSH = """
import os, signal, sys
from ckptctl.storage import Location
from ckptctl.tiering.push import PushOptions, push
run, url, endpoint, after = sys.argv[1:5]
done = 0
def on_bytes(rel, n):
    global done
    done += n
    if done >= int(after):
        os.kill(os.getpid(), signal.SIGKILL)
options = {"endpoint_url": endpoint, "config_kwargs": {"request_checksum_calculation": "when_required"}}
push(Location.from_url(run), Location.from_url(url, options),
     PushOptions(settle_seconds=0, part_size=5 * 2**20, jobs=1), on_bytes=on_bytes)
"""


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Upload records go to a folder of the test's own (inherited by the subprocesses)."""
    home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


def kill_after(run: Path, url: str, endpoint: str, parts: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLED_PUSH, str(run), url, endpoint, str(parts * PART)], capture_output=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


def part_uploads(server: Server, bucket: str, since: int = 0, key: str = MODEL) -> int:
    """UploadPart requests moto answered 200 for ``key`` of ``bucket`` after byte ``since`` of its log."""
    with server.log.open("rb") as handle:
        handle.seek(since)
        text = handle.read().decode(errors="replace")
    pattern = re.compile(rf'"PUT /{bucket}/remote\d*/{re.escape(key)}\?[^"]*partNumber=\d+[^"]*" 200')
    return len(pattern.findall(text))


def log_size(server: Server) -> int:
    return server.log.stat().st_size


def pending(remote: Location, bucket: str) -> list[dict]:
    return remote.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) or []


def push_cli(run: Path, url: str, endpoint: str, *extra: str) -> subprocess.CompletedProcess[str]:
    done = run_cli(
        "tier", "push", str(run), "--to", url, "--settle", "0", "--jobs", "2",
        "--storage-option", f"endpoint_url={endpoint}", *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def assert_tiered(run: Path, remote: Location) -> None:
    """The end state of a push that finished: every checkpoint's manifest verified, each object byte-identical
    with the local file."""
    view = remote_view(remote)
    assert set(view.manifests) == {"checkpoint-100"}
    check = check_manifest(view, view.manifests["checkpoint-100"], reread=True)
    assert check.state == "verified", check.problems
    for rel, data in tree(run).items():
        assert remote.read_bytes(rel) == data, rel


@pytest.mark.parametrize("store", ["moto", "ignores-checksums"])
def test_a_killed_multipart_upload_is_resumed_not_restarted(
    moto_server: Server, tmp_path: Path, state_home: Path, store: str
) -> None:
    """Level A (part CRC64NVMEs from ListParts) and level B (a store that keeps no checksum: the part ETag is its
    MD5): the 2 parts a killed push left are reused, only the 3 others are sent, and the object is whole."""
    backend = make_s3(moto_server)
    bucket = backend.url.removeprefix("s3://")
    run = make_run(tmp_path / "run", steps=(100,), size=SIZE, incomplete=None)
    with s3_stub(moto_server.endpoint, "ignore" if store != "moto" else "pass") as stub:
        kill_after(run, f"{backend.url}/remote", stub.endpoint, parts=2)
        remote = backend.location("remote")
        assert [u["Key"] for u in pending(remote, bucket)] == [f"remote/{MODEL}"]
        assert len(list(Path(upload_records_dir()).iterdir())) == 1

        since = log_size(moto_server)
        done = push_cli(
            run, f"{backend.url}/remote", stub.endpoint, "--part-size", "5MiB",
            "--storage-option", "config_kwargs.request_checksum_calculation=when_required",
        )  # fmt: skip
    assert part_uploads(moto_server, bucket, since) == PARTS - 2
    assert "2 of 5 parts (10 MiB) were already on the store" in done.stdout + done.stderr
    assert_tiered(run, remote)
    assert pending(remote, bucket) == [] and list(Path(upload_records_dir()).iterdir()) == []


def test_a_file_that_changed_since_the_kill_is_uploaded_afresh(moto_server: Server, tmp_path: Path) -> None:
    """The rule that uploads of changed files are aborted still holds: the old upload goes, every part of the
    new bytes is sent, and the store holds the new file."""
    backend = make_s3(moto_server)
    bucket = backend.url.removeprefix("s3://")
    run = make_run(tmp_path / "run", steps=(100,), size=SIZE, incomplete=None)
    kill_after(run, f"{backend.url}/remote", moto_server.endpoint, parts=3)
    model = run / MODEL
    stat = model.stat()
    model.write_bytes(os.urandom(SIZE))  # same size, new bytes and time
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    old = {u["UploadId"] for u in pending(backend.location("remote"), bucket)}

    since = log_size(moto_server)
    done = push_cli(run, f"{backend.url}/remote", moto_server.endpoint, "--part-size", "5MiB")
    assert part_uploads(moto_server, bucket, since) == PARTS
    assert "resumed" not in done.stdout + done.stderr
    remote = backend.location("remote")
    assert_tiered(run, remote)
    assert not old & {u["UploadId"] for u in pending(remote, bucket)} and pending(remote, bucket) == []


def test_a_file_with_the_same_time_but_other_bytes_is_not_resumed(
    moto_server: Server, tmp_path: Path
) -> None:
    """A part whose checksum does not match the local bytes (the file rewritten and its time put back) aborts
    the upload: nothing of it is reused, and the store holds the bytes on disk."""
    backend = make_s3(moto_server)
    bucket = backend.url.removeprefix("s3://")
    run = make_run(tmp_path / "run", steps=(100,), size=SIZE, incomplete=None)
    kill_after(run, f"{backend.url}/remote", moto_server.endpoint, parts=2)
    model = run / MODEL
    stat = model.stat()
    with model.open("r+b") as handle:  # one byte of part 2
        handle.seek(PART + 7)
        byte = handle.read(1)
        handle.seek(PART + 7)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    since = log_size(moto_server)
    done = push_cli(run, f"{backend.url}/remote", moto_server.endpoint, "--part-size", "5MiB")
    assert part_uploads(moto_server, bucket, since) == PARTS
    assert "resumed" not in done.stdout + done.stderr
    remote = backend.location("remote")
    assert_tiered(run, remote)
    assert pending(remote, bucket) == [] and list(Path(upload_records_dir()).iterdir()) == []


def test_another_part_size_starts_over(moto_server: Server, tmp_path: Path) -> None:
    backend = make_s3(moto_server)
    bucket = backend.url.removeprefix("s3://")
    run = make_run(tmp_path / "run", steps=(100,), size=SIZE, incomplete=None)
    kill_after(run, f"{backend.url}/remote", moto_server.endpoint, parts=2)

    since = log_size(moto_server)
    push_cli(run, f"{backend.url}/remote", moto_server.endpoint, "--part-size", "6MiB")
    assert part_uploads(moto_server, bucket, since) == 4  # 23 MiB in 6 MiB parts
    remote = backend.location("remote")
    assert_tiered(run, remote)
    manifest = remote_view(remote).manifests["checkpoint-100"]
    assert {f.part_size for f in manifest.files if f.path == MODEL} == {6 * MiB}
    assert pending(remote, bucket) == []


def test_an_upload_this_tool_did_not_record_is_never_adopted(moto_server: Server, tmp_path: Path) -> None:
    """The same bytes in the same parts, but no record that this tool started the upload (another machine,
    another user, another tool): it is aborted, as any stale upload under the unit, and the file sent whole."""
    backend = make_s3(moto_server)
    bucket = backend.url.removeprefix("s3://")
    run = make_run(tmp_path / "run", steps=(100,), size=SIZE, incomplete=None)
    kill_after(run, f"{backend.url}/remote", moto_server.endpoint, parts=3)
    for record in Path(upload_records_dir()).iterdir():
        record.unlink()

    since = log_size(moto_server)
    done = push_cli(run, f"{backend.url}/remote", moto_server.endpoint, "--part-size", "5MiB", "--json")
    assert part_uploads(moto_server, bucket, since) == PARTS
    assert re.findall(r'"aborted_uploads":\s*(\d+)', done.stdout) == ["1"]
    remote = backend.location("remote")
    assert_tiered(run, remote)
    assert pending(remote, bucket) == []


def test_kill_minus_9_during_a_resumed_multipart_upload(moto_server: Server, tmp_path: Path) -> None:
    """3 trials: ``tier push`` killed at a random moment after 1-2 parts of a 5-part file reached the store,
    killed again while it resumes (trial 2), then re-run to the end: each resumed run sends fewer parts than the
    file has, and the end state is exactly the verified remote copy."""
    rng = random.Random(18)
    backend = make_s3(moto_server)
    bucket = backend.url.removeprefix("s3://")
    pristine = make_run(tmp_path / "pristine", steps=(100,), size=SIZE, incomplete=None)
    original = tree(pristine)
    command = [
        sys.executable, "-m", "ckptctl", "tier", "push", "--settle", "0", "--jobs", "2", "--part-size", "5MiB",
        "--storage-option", f"endpoint_url={moto_server.endpoint}",
    ]  # fmt: skip

    def killed_when(run: Path, url: str, parts: int) -> int:
        """Start a push, SIGKILL it once ``parts`` parts of the model are logged; the parts logged by then."""
        since = log_size(moto_server)
        process = subprocess.Popen(
            [*command, str(run), "--to", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while part_uploads(moto_server, bucket, since) < parts and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        return part_uploads(moto_server, bucket, since)

    for trial in range(3):
        run = tmp_path / f"run{trial}"
        subprocess.run(["cp", "-a", str(pristine), str(run)], check=True)
        url = f"{backend.url}/remote{trial}"
        remote = backend.location(f"remote{trial}")
        first = killed_when(run, url, rng.randint(1, 2))
        assert first >= 1
        assert remote_view(remote).manifests == {}  # nothing committed by a killed push
        if trial == 2:  # killed again while resuming: what it adds is kept too
            killed_when(run, url, 1)
        since = log_size(moto_server)
        done = subprocess.run([*command, str(run), "--to", url], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        again = part_uploads(moto_server, bucket, since)
        assert again <= PARTS - min(first, PARTS - 1) and again < PARTS, (first, again)
        if trial != 2 and first < PARTS:  # (a kill while resuming may have let it finish)
            assert "were already on the store" in done.stdout + done.stderr
        assert tree(run) == original
        assert_tiered(run, remote)
        assert not [u for u in pending(remote, bucket) if u["Key"].startswith(f"remote{trial}/")]
    assert list(Path(upload_records_dir()).iterdir()) == []
