"""``ckptctl prune`` on an object store: requests and seconds to delete 999 of 1,000 units x 10 files on moto.

Against: deleting the same units the way a script does, ``s3fs.rm(unit, recursive=True)`` one unit at a time.
The bound is one DeleteObjects per 1,000 keys plus one listing walk. ckptctl adds, by design: a second listing
(re-validation just before deleting), the lock lease (PUT + DELETE), the journal (PUT + DELETE), a separate
DeleteObjects batch for completion markers (removed first), and one listing to verify what is left.
Usage: python bench/prune.py [UNITS] [FILES_PER_UNIT]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0], where bench/inspect.py would shadow the standard library's inspect.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from bench.list import count_requests, upload_run
from tests.conftest import start_moto


def main() -> None:
    units = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    per_unit = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    import s3fs

    server = start_moto()
    try:
        assert server.log is not None
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        for bucket in ("ours", "script"):
            fs.mkdir(bucket)
            upload_run(fs, bucket, units, per_unit)
        print(f"setup: 2 x {units} units x {per_unit} files uploaded")

        mark = server.log.stat().st_size
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ckptctl",
                "prune",
                "s3://ours/run",
                "--keep-last",
                "1",
                "--settle",
                "0",
                "--ignore-time-order",
                "--quiet",
                "-o",
                f"endpoint_url={server.endpoint}",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        ours = time.perf_counter() - t0
        time.sleep(0.3)
        ours_requests = count_requests(server.log, mark)
        left = fs.find("ours/run")

        mark = server.log.stat().st_size
        t0 = time.perf_counter()
        script = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
        for u in range(units - 1):
            script.rm(f"script/run/checkpoint-{(u + 1) * 100}", recursive=True)
        theirs = time.perf_counter() - t0
        time.sleep(0.3)
        their_requests = count_requests(server.log, mark)

        keys = (units - 1) * per_unit
        bound = -(-keys // 1000) + -(-(units * per_unit) // 1000)
        total_ours, total_theirs = sum(ours_requests.values()), sum(their_requests.values())
        print(
            f"ckptctl prune --keep-last 1: {ours:.2f}s (process), requests {total_ours} {dict(ours_requests)}; "
            f"{len(left)} keys left"
        )
        print(f"s3fs rm(recursive) per unit: {theirs:.2f}s, requests {total_theirs} {dict(their_requests)}")
        print(
            f"bound (DeleteObjects per 1,000 keys + listing pages): {bound}; ckptctl/bound {total_ours / bound:.2f}x; "
            f"ckptctl/script requests {total_ours / total_theirs:.3f}, seconds {ours / theirs:.2f}x"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
