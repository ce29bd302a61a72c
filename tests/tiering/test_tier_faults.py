"""``ckptctl tier`` under faults, as the real command: kill -9, the server killed, corrupted objects, a full disk,
and bad input. Each ends with local data intact and nothing claimed that is not true."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptctl.storage import Location
from ckptctl.tiering.manifest import check_manifest, remote_view
from tests.conftest import Backend, Server, free_port, run_cli, start_moto
from tests.tiering.test_tier import make_run, tree

CLI = [sys.executable, "-m", "ckptctl"]


def s3_args(backend: Backend) -> list[str]:
    return backend.cli_options


def check_invariants(run: Path, original: dict[str, bytes], remote: Location) -> set[str]:
    """After any interruption: every manifest describes a whole, byte-identical copy, and every checkpoint gone
    (or going) from the local disk has such a copy. Returns the units with a manifest."""
    view = remote_view(remote)
    for unit, manifest in view.manifests.items():
        check = check_manifest(view, manifest, reread=True)
        assert check.state == "verified", (unit, check.problems)
        for item in manifest.files:
            assert remote.read_bytes(item.path) == original[item.path], item.path
    if remote.exists("latest"):  # a pointer goes up only after the manifest of what it names
        assert remote.read_bytes("latest").decode() in view.manifests, "remote latest names an untiered unit"
    units = {rel.split("/", 1)[0] for rel in original if "/" in rel}
    for unit in units:
        local_files = {rel for rel in original if rel.startswith(unit + "/")}
        if all((run / rel).exists() and (run / rel).read_bytes() == original[rel] for rel in local_files):
            continue
        # Some local file of this unit is gone: only allowed with a verified remote copy.
        assert unit in view.manifests, f"{unit} lost local files without a manifest"
    return set(view.manifests)


@pytest.mark.parametrize("store", ["local", "s3", "gcs"])
def test_kill_minus_9_never_frees_or_commits_what_is_not_safe(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """38 trials in all: each from a fresh run, push --keep-local-last 1 killed at a random moment of its
    measured duration; after every kill the invariants hold (the remote ``latest`` included), and every 4th trial
    a re-run completes the job."""
    from tests.conftest import make_backend

    trials = {"local": 18, "s3": 14, "gcs": 6}[store]
    rng = random.Random(store)
    backend = None if store == "local" else make_backend(store, tmp_path, request)
    pristine = make_run(
        tmp_path / "pristine", steps=(100, 200, 300, 400, 500), size=3_000_000, incomplete=600
    )
    (pristine / "latest").write_text("checkpoint-400")  # a run-level pointer file: pushed last, never freed
    original = tree(pristine)

    def fresh(trial: int) -> tuple[Path, list[str], Location]:
        run = tmp_path / f"run{trial}"
        shutil.copytree(pristine, run)  # copy2: file times kept, so the checkpoints are settled
        if backend is not None:
            url, options = f"{backend.url}/remote{trial}", backend.cli_options
            remote = backend.location(f"remote{trial}")
        else:
            url, options = str(tmp_path / f"remote{trial}"), []
            remote = Location.from_url(url)
        command = [
            *CLI,
            "tier",
            "push",
            str(run),
            "--to",
            url,
            "--settle",
            "0",
            "--keep-local-last",
            "1",
            *options,
        ]
        return run, command, remote

    # The push's length, to kill within it: the quicker of two runs, so one slowed by a busy machine (the other
    # test workers) does not set kill times the later pushes finish before.
    durations = []
    for calibration in (-1, -2):
        run, command, remote = fresh(calibration)
        started = time.monotonic()
        assert subprocess.run(command, capture_output=True).returncode == 0
        durations.append(time.monotonic() - started)
    duration = min(durations)
    killed = 0
    for trial in range(trials):
        run, command, remote = fresh(trial)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, duration))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.wait()
        check_invariants(run, original, remote)
        if trial % 4 == 0:
            done = subprocess.run(command, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            tiered = check_invariants(run, original, remote)
            assert tiered == {f"checkpoint-{s}" for s in (100, 200, 300, 400, 500)}
            # Freed: all but the newest complete one and the one latest names; the half-written 600 is neither
            # touched nor tiered.
            kept = {
                k: v
                for k, v in original.items()
                if k.split("/")[0] in ("checkpoint-400", "checkpoint-500", "checkpoint-600", "latest")
            }
            assert remote.read_bytes("latest") == b"checkpoint-400"
            assert tree(run) == kept
            if store == "s3":  # every multipart upload a kill left behind was aborted by the re-run
                bucket = backend.url.removeprefix("s3://")  # type: ignore[union-attr]
                uploads = remote.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=f"remote{trial}/")
                assert not uploads.get("Uploads")
        shutil.rmtree(run)
    assert killed >= trials // 2


def test_server_killed_mid_push_then_rerun_after_restart(tmp_path: Path) -> None:
    import s3fs

    server = start_moto()
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(endpoint_url=server.endpoint).mkdir("tier-bucket")
        run = make_run(tmp_path / "run", steps=(100, 200, 300), size=30_000_000, incomplete=None)
        original = tree(run)
        command = [
            *CLI, "tier", "push", str(run), "--to", "s3://tier-bucket/run", "--settle", "0",
            "--keep-local-last", "1", "-o", f"endpoint_url={server.endpoint}", "--jobs", "2",
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.log is not None
        deadline = time.monotonic() + 60
        while b"uploadId" not in server.log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()  # mid-upload: the first multipart upload has started
        _, stderr = process.communicate(timeout=120)
        assert process.returncode not in (0, None)
        assert "Traceback" not in stderr
        assert [line for line in stderr.splitlines() if line.startswith("error: cannot reach the store")]
        assert tree(run) == original  # nothing freed, nothing touched

        restarted = Server("moto", server.argv, server.port, server.probe).start()
        try:
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem(endpoint_url=restarted.endpoint).mkdir("tier-bucket")  # moto keeps nothing
            done = subprocess.run(command, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr
            remote = Location.from_url("s3://tier-bucket/run", {"endpoint_url": restarted.endpoint})
            assert check_invariants(run, original, remote) == {
                "checkpoint-100",
                "checkpoint-200",
                "checkpoint-300",
            }
        finally:
            restarted.stop()
    finally:
        server.stop()


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_corrupted_object_is_detected_by_status_and_pull(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from tests.conftest import make_backend

    backend = make_backend(store, tmp_path, request)
    run = make_run(tmp_path / "run", steps=(100, 200), incomplete=None)
    original = tree(run)
    url = f"{backend.url}/remote"
    pushed = run_cli("tier", "push", str(run), "--to", url, "--settle", "0", *backend.cli_options)
    assert pushed.returncode == 0, pushed.stderr
    # Overwrite one object through the server's API: same size, different bytes.
    remote = backend.location("remote")
    victim = "checkpoint-100/optimizer.pt"
    remote.fs.pipe_file(remote.full_path(victim), bytes(len(original[victim])))

    status = run_cli("tier", "status", str(run), "--remote", url, "--json", *backend.cli_options)
    assert status.returncode == 8
    units = {u["path"]: u for u in json.loads(status.stdout)["data"]["units"]}
    assert units["checkpoint-100"]["remote"] == "corrupt" and units["checkpoint-200"]["remote"] == "verified"
    assert victim in units["checkpoint-100"]["problems"][0]

    dest = tmp_path / "restored"
    pulled = run_cli("tier", "pull", url, str(dest), "--step", "100", *backend.cli_options)
    assert pulled.returncode == 8, pulled.stderr
    assert "optimizer.pt" in pulled.stderr and "Traceback" not in pulled.stderr
    assert not dest.exists() and not list(tmp_path.glob(".restored*"))
    # Restoring the whole run brings the sound checkpoint and reports the corrupt one (exit 5: partial).
    restored_run = tmp_path / "restored-run"
    many = run_cli("tier", "pull", url, str(restored_run), "--all", "--json", *backend.cli_options)
    assert many.returncode == 5, many.stderr
    envelope = json.loads(many.stdout)
    # Some of the work was done: "partial", as the README promises for exit 5, with what was pulled in data.
    assert envelope["status"] == "partial" and envelope["exit_code"] == 5
    data = envelope["data"]
    assert [p["unit"] for p in data["pulled"]] == ["checkpoint-200"]
    assert [(f["unit"], f["code"]) for f in data["failed"]] == [("checkpoint-100", "integrity")]
    assert sorted(p.name for p in restored_run.iterdir()) == ["checkpoint-200"]
    assert tree(restored_run) == {k: v for k, v in original.items() if k.startswith("checkpoint-200/")}

    # A push that frees local copies repairs the corrupt one first, and frees only verified copies.
    freed = run_cli(
        "tier", "push", str(run), "--to", url, "--settle", "0", "--keep-local-last", "1", *backend.cli_options
    )
    assert freed.returncode == 0, freed.stderr
    assert remote.read_bytes(victim) == original[victim]
    assert not (run / "checkpoint-100").exists() and tree(run) == {
        k: v for k, v in original.items() if k.startswith("checkpoint-200/")
    }


def test_pull_on_a_full_disk_leaves_no_partial_folder(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(100,), size=4_000_000, incomplete=None)
    remote = tmp_path / "remote"
    assert run_cli("tier", "push", str(run), "--to", str(remote), "--settle", "0").returncode == 0
    dest = tmp_path / "pulled" / "checkpoint-100"
    dest.parent.mkdir()

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    done = subprocess.run(
        [*CLI, "tier", "pull", str(remote), str(dest), "--step", "100"],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: no space left") and "Traceback" not in done.stderr
    assert list(dest.parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_pull_into_a_read_only_folder(tmp_path: Path) -> None:  # pragma: no cover - needs a non-root user
    run = make_run(tmp_path / "run", steps=(100,), incomplete=None)
    remote = tmp_path / "remote"
    assert run_cli("tier", "push", str(run), "--to", str(remote), "--settle", "0").returncode == 0
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    done = run_cli("tier", "pull", str(remote), str(parent / "c"), "--step", "100")
    assert done.returncode == 3 and "permission denied" in done.stderr.lower()


def test_bad_stores_fail_in_one_line_and_change_nothing(moto_server: Server, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(100, 200), incomplete=None)
    original = tree(run)
    base = ["tier", "push", str(run), "--settle", "0", "--keep-local-last", "1"]
    endpoint = ["-o", f"endpoint_url={moto_server.endpoint}"]
    missing = run_cli(*base, "--to", "s3://no-such-bucket-here/run", *endpoint)
    assert missing.returncode == 3 and "no such bucket" in missing.stderr
    dead = run_cli(*base, "--to", "s3://bucket/run", "-o", f"endpoint_url=http://127.0.0.1:{free_port()}")
    assert dead.returncode == 1 and "cannot reach" in dead.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    nocreds = run_cli(*base, "--to", "s3://bucket/run", *endpoint, env=env)
    assert nocreds.returncode == 3 and "credentials" in nocreds.stderr
    for result in (missing, dead, nocreds):
        assert len(result.stderr.strip().splitlines()) <= 2 and "Traceback" not in result.stderr
    assert tree(run) == original


def test_cli_contract_dry_run_json_and_usage(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(100, 200), incomplete=None)
    remote = tmp_path / "remote"
    dry = run_cli(
        "tier", "push", str(run), "--to", str(remote), "--settle", "0", "--dry-run", "--keep-local-last", "1"
    )
    assert dry.returncode == 0 and not remote.exists()
    assert "would upload checkpoint-100" in dry.stderr

    pushed = run_cli("tier", "push", str(run), "--to", str(remote), "--settle", "0", "--json")
    assert pushed.returncode == 0, pushed.stderr
    events = [json.loads(line) for line in pushed.stdout.splitlines()]
    assert [e["event"] for e in events] == ["uploaded", "uploaded", "summary"]
    assert events[-1]["uploaded"] == 2 and events[-1]["uploaded_bytes"] == sum(e["bytes"] for e in events[:2])

    again = run_cli("tier", "push", str(run), "--to", str(remote), "--settle", "0", "--json")
    assert [json.loads(line)["event"] for line in again.stdout.splitlines()] == [
        "already",
        "already",
        "summary",
    ]

    dest = tmp_path / "out"
    pulled = run_cli("tier", "pull", str(remote), str(dest), "--latest", "--json")
    assert pulled.returncode == 0, pulled.stderr
    data = json.loads(pulled.stdout)["data"]
    assert data["step"] == 200 and data["bytes"] == sum(len(v) for k, v in tree(run).items() if "200" in k)
    exists = run_cli("tier", "pull", str(remote), str(dest), "--latest")
    assert exists.returncode == 4 and "already exists" in exists.stderr
    missing = run_cli("tier", "pull", str(remote), str(tmp_path / "x"), "--step", "300")
    assert missing.returncode == 3 and "tiered steps: 100, 200" in missing.stderr
    both = run_cli("tier", "pull", str(remote), str(tmp_path / "y"), "--step", "100", "--latest")
    assert both.returncode == 2
