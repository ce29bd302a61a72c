"""``ckptctl list`` on an object store: requests and seconds for a run of 1,000 units x 10 files on moto.

The goal is listing requests only (one paginated ListObjectsV2 walk: 10,000 keys = 10 pages), no HEAD or GET
per unit. For comparison, the same question answered the way a hand-written script does it with s3fs:
``ls`` the run, then ``ls`` each unit (one LIST per unit). Requests are counted from moto's own access log.
Usage: python bench/list.py [UNITS] [FILES_PER_UNIT]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0], where bench/inspect.py would shadow the standard library's inspect.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from tests.conftest import start_moto

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')


UNIT_FILES = [
    "config.json",
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "training_args.bin",
    "generation_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "trainer_state.json",
]


def upload_run(fs, bucket: str, units: int, per_unit: int) -> None:
    """An HF Trainer-shaped run of ``units`` checkpoints with ``per_unit`` small files each, at bucket/run."""
    payload = {
        f"{bucket}/run/checkpoint-{(u + 1) * 100}/{name}": b"{}"
        for u in range(units)
        for name in UNIT_FILES[:per_unit]
    }
    fs.pipe(payload, batch_size=64)


def count_requests(log: Path, start: int) -> Counter[str]:
    """Requests moto logged after byte ``start`` of its log, by kind (LIST / GET / HEAD / ...)."""
    kinds: Counter[str] = Counter()
    with log.open("rb") as handle:
        handle.seek(start)
        text = _ANSI.sub("", handle.read().decode(errors="replace"))  # moto colours non-200 lines
        for line in text.splitlines():
            found = _REQUEST.search(line)
            if not found:
                continue
            method, target = found.groups()
            if method == "GET" and ("list-type" in target or "prefix=" in target):
                method = "LIST"
            elif method == "POST" and "delete" in target:
                method = "DeleteObjects"
            kinds[method] += 1
    return kinds


def main() -> None:
    units = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    per_unit = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    import s3fs

    server = start_moto()
    try:
        assert server.log is not None
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        fs.mkdir("bench")
        t0 = time.perf_counter()
        upload_run(fs, "bench", units, per_unit)
        print(
            f"setup: {units} units x {per_unit} files = {units * per_unit} objects uploaded in {time.perf_counter() - t0:.1f}s"
        )

        env = dict(os.environ)
        mark = server.log.stat().st_size
        t0 = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ckptctl",
                "list",
                "s3://bench/run",
                "--json",
                "--settle",
                "0",
                "-o",
                f"endpoint_url={server.endpoint}",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        ours = time.perf_counter() - t0
        time.sleep(0.2)
        ours_requests = count_requests(server.log, mark)
        listed = json.loads(result.stdout)["data"]["summary"]

        mark = server.log.stat().st_size
        t0 = time.perf_counter()
        script = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
        found = 0
        for unit in script.ls("bench/run", detail=False):
            found += len(script.ls(unit, detail=True))
        naive = time.perf_counter() - t0
        time.sleep(0.2)
        naive_requests = count_requests(server.log, mark)

        total_ours = sum(ours_requests.values())
        total_naive = sum(naive_requests.values())
        print(
            f"ckptctl list: {listed['units']} units, {listed['files']} files in {ours:.2f}s (process, incl. start-up); "
            f"requests {total_ours} {dict(ours_requests)}"
        )
        print(
            f"s3fs ls per unit: {found} files in {naive:.2f}s; requests {total_naive} {dict(naive_requests)}"
        )
        print(
            f"ratio requests ckptctl/script: {total_ours / total_naive:.3f}; seconds: {ours / naive:.2f}x; "
            f"lower bound (one LIST per 1,000 keys): {-(-units * per_unit // 1000)}"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
