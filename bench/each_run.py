"""``ckptctl prune ROOT --each-run`` on 100 runs, against the cron line people write today: a shell loop of
``ckptctl prune RUN --keep-last 2`` over the runs (one process per run).

Each side gets its own fresh copy of the same root (RUNS runs x CKPTS HF-layout checkpoints, a root
``.ckptctl.toml`` with keep-last = 2), on local disk and, with ``--s3``, on moto (requests counted from moto's
access log). Prints seconds, requests, and the ratio loop / each-run per repeat.
Usage: python bench/each_run.py [--runs 100] [--ckpts 10] [--repeat 3] [--s3]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ is sys.path[0], where bench/inspect.py would shadow the standard library's inspect.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

POLICY = b"keep-last = 2\nsettle = 0\n"


def make_root(root: Path, runs: int, ckpts: int) -> list[str]:
    names = []
    stamp = time.time() - 7200
    for r in range(runs):
        name = f"run-{r:03d}"
        names.append(name)
        for step in range(100, 100 * (ckpts + 1), 100):
            unit = root / name / f"checkpoint-{step}"
            unit.mkdir(parents=True)
            (unit / "model.safetensors").write_bytes(b"\0" * 4096)
            (unit / "optimizer.pt").write_bytes(b"\0" * 8192)
            (unit / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
            for path in unit.iterdir():
                os.utime(path, (stamp + step, stamp + step))
    (root / ".ckptctl.toml").write_bytes(POLICY)
    return names


def ckptctl(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "ckptctl", *args],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


def timed(work) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--ckpts", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="also on moto (S3 protocol server on 127.0.0.1)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="each-run-bench-"))
    template = work / "template"
    names = make_root(template, args.runs, args.ckpts)
    print(
        f"root: {args.runs} runs x {args.ckpts} checkpoints x 3 files; keep-last 2 from the root policy file"
    )
    try:
        for trial in range(args.repeat):
            ours_root, loop_root = work / f"ours{trial}", work / f"loop{trial}"
            shutil.copytree(template, ours_root)
            shutil.copytree(template, loop_root)
            ours = timed(lambda r=ours_root: ckptctl("prune", str(r), "--each-run", "--quiet"))
            loop = timed(
                lambda r=loop_root: [
                    ckptctl("prune", str(r / n), "--keep-last", "2", "--quiet") for n in names
                ]
            )
            left = sorted(p.name for p in (ours_root / names[0]).iterdir())
            assert left == sorted(p.name for p in (loop_root / names[0]).iterdir()), "the two disagree"
            print(
                f"local #{trial + 1}: each-run {ours:.2f}s, loop of {len(names)} prunes {loop:.2f}s, "
                f"ratio {loop / ours:.2f}x"
            )
        if args.s3:
            s3_bench(template, names)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def s3_bench(template: Path, names: list[str]) -> None:
    import s3fs

    from bench.list import count_requests
    from tests.conftest import start_moto

    server = start_moto()
    try:
        assert server.log is not None
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        fs.mkdir("ours")
        fs.mkdir("loop")
        for bucket in ("ours", "loop"):
            fs.put(str(template) + "/", f"{bucket}/root", recursive=True)
        options = ["--storage-option", f"endpoint_url={server.endpoint}"]
        mark = server.log.stat().st_size
        ours = timed(lambda: ckptctl("prune", "s3://ours/root", "--each-run", "--quiet", *options))
        ours_requests = count_requests(server.log, mark)
        mark = server.log.stat().st_size
        loop = timed(
            lambda: [
                ckptctl(
                    "prune", f"s3://loop/root/{n}", "--keep-last", "2", "--settle", "0", "--quiet", *options
                )
                for n in names
            ]
        )
        loop_requests = count_requests(server.log, mark)
        print(
            f"moto: each-run {ours:.2f}s {dict(ours_requests)}; loop {loop:.2f}s {dict(loop_requests)}; "
            f"ratio {loop / ours:.2f}x"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
