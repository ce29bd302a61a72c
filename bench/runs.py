"""``ckptctl runs ROOT`` on an object store: requests and seconds for RUNS runs x CKPTS checkpoints x FILES files
on moto (default 1,000 x 20 x 10 = 200,000 objects).

The bound is the listing itself: ``s3fs.find`` of the whole root, one ListObjectsV2 page per 1,000 keys. ckptctl
must stay at that (plus one ListMultipartUploads), never a request per checkpoint or per run. Requests are
counted from moto's own access log (bench/list.py ``count_requests``); seconds are wall time, median of
``--repeat`` runs, ckptctl as a process (start-up included) and ``find`` in-process. Each run is HF
Trainer-shaped (``run-NNNN/checkpoint-N/...``, the last checkpoint of every tenth run without its
``trainer_state.json``), with one incomplete multipart upload per hundred runs.

Usage: python bench/runs.py [--runs 1000] [--checkpoints 20] [--files 10] [--repeat 3]
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

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from bench.list import UNIT_FILES, count_requests
from tests.conftest import Server, start_moto


def upload_root(fs, bucket: str, runs: int, checkpoints: int, files: int) -> int:
    """``runs`` HF Trainer runs under bucket/root; returns the number of objects written."""
    written = 0
    for first in range(0, runs, 50):
        payload = {}
        for r in range(first, min(first + 50, runs)):
            for c in range(checkpoints):
                last = c == checkpoints - 1 and r % 10 == 0
                for name in UNIT_FILES[:files]:
                    if not (last and name == "trainer_state.json"):
                        payload[f"{bucket}/root/run-{r:04d}/checkpoint-{(c + 1) * 100}/{name}"] = b"{}"
        fs.pipe(payload, batch_size=64)
        written += len(payload)
    for r in range(0, runs, 100):
        fs.call_s3(
            "create_multipart_upload", Bucket=bucket, Key=f"root/run-{r:04d}/checkpoint-999/model.safetensors"
        )
    return written


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
    args = parser.parse_args()
    import s3fs

    if args.endpoint:
        server = Server("moto", [], int(args.endpoint.rsplit(":", 1)[1]), "/moto-api/")
        server.log = Path(args.log) if args.log else None
    else:
        server = start_moto()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        fs.mkdir("bench")
        t0 = time.perf_counter()
        objects = upload_root(fs, "bench", args.runs, args.checkpoints, args.files)
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
