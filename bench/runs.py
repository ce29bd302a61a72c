"""``ckptctl runs ROOT`` on an object store: requests and seconds for RUNS runs x CKPTS checkpoints x FILES files
on moto (default 1,000 x 20 x 10 = 200,000 objects).

The bound is the listing itself: ``s3fs.find`` of the whole root, one ListObjectsV2 page per 1,000 keys. ckptctl
must stay at that (plus one ListMultipartUploads), never a request per checkpoint or per run. Requests are
counted from moto's own access log (bench/list.py ``count_requests``); seconds are wall time, median of
``--repeat`` runs, ckptctl as a process (start-up included) and ``find`` in-process. Each run is HF
Trainer-shaped (``run-NNNN/checkpoint-N/...``, the last checkpoint of every tenth run without its
``trainer_state.json``), with one incomplete multipart upload per hundred runs.

Usage: python bench/runs.py [--runs 1000] [--checkpoints 20] [--files 10] [--repeat 3] [--fill direct|api]
       python bench/runs.py --endpoint http://127.0.0.1:PORT --setup-only ...   (fill a running moto_server, for
       farm-bench: ``ckptctl runs s3://bench/root -o endpoint_url=...`` against a ``find`` one-liner)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0], where bench/inspect.py would shadow the standard library's inspect.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import os
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from bench.list import UNIT_FILES, count_requests
from tests.conftest import Server, free_port, start_moto


def root_keys(runs: int, checkpoints: int, files: int) -> Iterator[str]:
    """The keys under ``root/`` (bucket not included): ``runs`` HF Trainer runs, the last checkpoint of every
    tenth run without its ``trainer_state.json``."""
    for r in range(runs):
        for c in range(checkpoints):
            last = c == checkpoints - 1 and r % 10 == 0
            for name in UNIT_FILES[:files]:
                if not (last and name == "trainer_state.json"):
                    yield f"root/run-{r:04d}/checkpoint-{(c + 1) * 100}/{name}"


def upload_root(fs, bucket: str, runs: int, checkpoints: int, files: int) -> int:
    """The root through the S3 API (one PUT per object, slow for 200,000); returns the objects written."""
    written = 0
    batch: dict[str, bytes] = {}
    for key in root_keys(runs, checkpoints, files):
        batch[f"{bucket}/{key}"] = b"{}"
        if len(batch) >= 5000:
            fs.pipe(batch, batch_size=64)
            written, batch = written + len(batch), {}
    fs.pipe(batch, batch_size=64)
    return written + len(batch)


def add_uploads(fs, bucket: str, runs: int) -> None:
    """One incomplete multipart upload per hundred runs: a leftover ``runs`` must report."""
    for r in range(0, runs, 100):
        fs.call_s3(
            "create_multipart_upload", Bucket=bucket, Key=f"root/run-{r:04d}/checkpoint-999/model.safetensors"
        )


FILLED_SERVER = """
import logging, sys, time
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.s3.models import s3_backends
sys.path[0] = sys.argv[2]
from bench.runs import root_keys
port, runs, checkpoints, files = int(sys.argv[1]), *map(int, sys.argv[3:6])
backend = s3_backends["123456789012"]["aws"]
backend.create_bucket("bench", "us-east-1")
count = 0
for key in root_keys(runs, checkpoints, files):
    backend.put_object("bench", key, b"{}")
    count += 1
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=True)
server.start()
print(f"filled {count}", flush=True)
while True:
    time.sleep(3600)
"""


def start_filled_moto(runs: int, checkpoints: int, files: int) -> tuple[Server, int]:
    """A moto server whose bucket is filled in its own process before it serves (no PUT per object, so
    200,000 objects take a minute, not hours); its access log counts only the requests made afterwards."""
    port = free_port()
    repo = str(Path(__file__).resolve().parent.parent)
    server = Server(
        "moto-filled",
        [sys.executable, "-c", FILLED_SERVER, str(port), repo, str(runs), str(checkpoints), str(files)],
        port,
        "/moto-api/",
    )
    server.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ckptctl-bench-moto-{port}.log"
    handle = server.log.open("wb")
    server.process = subprocess.Popen(server.argv, stdout=subprocess.PIPE, stderr=handle)
    assert server.process.stdout is not None
    line = ""
    while not line.startswith("filled "):
        line = server.process.stdout.readline().decode()
        if not line:
            break
    if not line.startswith("filled "):
        server.stop()
        raise SystemExit(f"the filled moto server did not start: {line!r} (see {server.log})")
    return server, int(line.split()[1])


def measured(server: Server, work) -> tuple[float, Counter[str], object]:
    assert server.log is not None
    mark = server.log.stat().st_size
    t0 = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - t0
    time.sleep(0.3)  # let moto flush its log
    return seconds, count_requests(server.log, mark), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--endpoint", help="a moto_server already running (else one is started and stopped)")
    parser.add_argument("--log", help="that server's access log (its stderr), to count requests")
    parser.add_argument("--setup-only", action="store_true", help="upload the root and exit")
    parser.add_argument(
        "--fill",
        choices=("direct", "api"),
        default="direct",
        help="direct: a moto server filled in its own process before it serves (fast); api: PUT every object",
    )
    args = parser.parse_args()
    import s3fs

    t0 = time.perf_counter()
    if args.endpoint:
        server = Server("moto", [], int(args.endpoint.rsplit(":", 1)[1]), "/moto-api/")
        server.log = Path(args.log) if args.log else None
    elif args.fill == "direct":
        server, objects = start_filled_moto(args.runs, args.checkpoints, args.files)
    else:
        server = start_moto()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        if args.endpoint or args.fill == "api":
            fs.mkdir("bench")
            objects = upload_root(fs, "bench", args.runs, args.checkpoints, args.files)
        add_uploads(fs, "bench", args.runs)
        print(
            f"setup: {args.runs} runs x {args.checkpoints} checkpoints x {args.files} files = {objects} objects "
            f"in {time.perf_counter() - t0:.0f}s"
        )
        if args.setup_only:
            return

        def ours() -> dict:
            argv = [sys.executable, "-m", "ckptctl", "runs", "s3://bench/root", "--json", "--settle", "0"]
            argv += ["-o", f"endpoint_url={server.endpoint}"]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            return json.loads(done.stdout)["data"]["totals"]

        def reference() -> int:
            script = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
            return len(script.find("bench/root", detail=True))

        ours_runs = [measured(server, ours) for _ in range(args.repeat)]
        find_runs = [measured(server, reference) for _ in range(args.repeat)]
        totals = ours_runs[0][2]
        assert isinstance(totals, dict)
        ours_s = statistics.median(r[0] for r in ours_runs)
        find_s = statistics.median(r[0] for r in find_runs)
        ours_req, find_req = ours_runs[0][1], find_runs[0][1]
        print(
            f"ckptctl runs: {totals['runs']} runs, {totals['checkpoints']} checkpoints, {totals['files']} files, "
            f"{totals['leftovers']} leftovers ({totals['multipart_uploads']} multipart uploads); "
            f"median {ours_s:.2f}s of {args.repeat} (process, start-up included); "
            f"requests {sum(ours_req.values())} {dict(ours_req)}"
        )
        print(
            f"s3fs.find(detail=True): {find_runs[0][2]} objects; median {find_s:.2f}s of {args.repeat} (in-process); "
            f"requests {sum(find_req.values())} {dict(find_req)}"
        )
        print(
            f"ratio ckptctl/find: requests {sum(ours_req.values()) / sum(find_req.values()):.3f}, "
            f"seconds {ours_s / find_s:.2f}x; lower bound (one LIST per 1,000 keys): {-(-objects // 1000)}"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
