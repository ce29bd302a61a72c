"""``ckptctl consolidate`` against DeepSpeed's ``zero_to_fp32.py --safe_serialization`` and the I/O floor.

Generates a ~183M-parameter bf16 ZeRO checkpoint (stages 2 and 3, 2 ranks) with the fixture generator in
shared/fixtures/zero/gen at bench time, then, cold cache (posix_fadvise DONTNEED on the inputs) before each run:
ckptctl, zero_to_fp32 (in a scratch venv with DeepSpeed, never the project's), and the floor (read just the fp32
master ranges + write + fsync, in one process). Prints wall time, peak RSS and ratios, and checks the outputs are
equal tensor by tensor. Usage: python bench/consolidate.py [--ds-python PATH] [--keep DIR] [--case zero|dcp|remote|all]
[--server moto|rgw]

The DCP case (issue 17): an FSDP2 checkpoint in torchtitan's layout (model FQNs at the top level, AdamW state
under ``optimizer``), 2 ranks, gloo, CPU, generated at bench time with this interpreter's torch at two model
sizes. Against torch's ``dcp_to_torch_save`` plus writing its model tensors as safetensors (what users then do),
and the floor (read the model's chunks + write + fsync). Peak RSS should not grow with the model.

The remote case: the 20-layer DCP checkpoint uploaded to moto (or Ceph RGW, ``--server rgw``), converted with
SRC on the store, OUT on the store, and both, against what users do without streaming: download the folder
with boto3, convert it locally, upload the result with boto3.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # bench/inspect.py must not shadow stdlib inspect

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time

from ckptctl.formats.deepspeed import plan_zero
from ckptctl.formats.sources import plan_source
from ckptctl.formats.tensor_layout import Range
from ckptctl.storage import Location
from ckptctl.storage.writeback import write_at

GEN = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "zero" / "gen" / "gen_ckpt.py"
MODEL = [
    "--model",
    "big",
    "--width",
    "1536",
    "--layers",
    "36",
    "--vocab",
    "32000",
    "--no-tied",
    "--steps",
    "2",
    "--lr",
    "1e-4",
]


def scratch_deepspeed(root: Path) -> Path:
    """A venv with torch (CPU) and DeepSpeed for the generator and the reference converter."""
    venv = root / "dsvenv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "deepspeed==0.19.8", "transformers", "numpy", "ninja"], check=True)
    return venv / "bin" / "python"


def evict(folder: Path) -> None:
    """Cold cache for ``folder``, after writing back every dirty page (a previous step's output would otherwise
    be flushed during the next timed run and charged to it)."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(
            f"{argv[:3]} failed: {process.stderr.read().decode()[-2000:] if process.stderr else ''}"
        )
    return wall, usage.ru_maxrss // 1024


def floor(checkpoint: Path, out: Path) -> float:
    """Read only the fp32 master ranges, write them, fsync: what any converter must at least do."""
    plan = plan_zero(Location.from_url(str(checkpoint)))
    return copy_ranges(checkpoint, [p for t in plan.tensors for p in t.ranges], out)


def copy_ranges(checkpoint: Path, ranges: list[Range], out: Path) -> float:
    """Seconds to read ``ranges`` (cold cache) into ``out`` and fsync it, written behind (``write_at``)."""
    evict(checkpoint)
    start = time.perf_counter()
    handles: dict[str, int] = {}
    sink = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        at = 0
        for piece in ranges:
            fd = handles.setdefault(piece.rel, os.open(checkpoint / piece.rel, os.O_RDONLY))
            data = os.pread(fd, piece.end - piece.start, piece.start)
            write_at(
                sink, data, at
            )  # queued for write-out at once, as ckptctl writes: the fsync finds little
            at += len(data)
        os.fsync(sink)
    finally:
        os.close(sink)
    for fd in handles.values():
        os.close(fd)
    return time.perf_counter() - start


def tensor_hashes(path: Path) -> dict[str, str]:
    """sha256 per tensor, read tensor by tensor: this process stays small, because a child forked from a big
    parent starts with the parent's peak RSS and would be mis-measured."""
    hashes = {}
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        base = 8 + size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            handle.seek(base + start)
            digest = hashlib.sha256()
            remaining = end - start
            while remaining:
                chunk = handle.read(min(remaining, 64 * 2**20))
                digest.update(chunk)
                remaining -= len(chunk)
            hashes[name] = digest.hexdigest()
    return hashes


GEN_DCP = """
import os, sys
import torch, torch.nn as nn, torch.distributed as dist, torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

def worker(rank, out, layers, width):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    optim.step()
    sd, osd = get_state_dict(model, optim, options=StateDictOptions(flatten_optimizer_state_dict=True))
    dcp.save({**sd, "optimizer": osd}, checkpoint_id=out)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])), nprocs=2, join=True)
"""

TORCH_CONVERT = """
import sys
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
import torch
from safetensors.torch import save_file
dcp_to_torch_save(sys.argv[1], sys.argv[2])
state = torch.load(sys.argv[2], weights_only=False)
model = {k: v for k, v in state.items() if k != "optimizer"}
save_file(model, sys.argv[3])
"""


def dcp_floor(checkpoint: Path, out: Path) -> float:
    """Read every model chunk, write it, fsync: what any DCP converter must at least do."""
    plan = plan_source(Location.from_url(str(checkpoint)))
    return copy_ranges(checkpoint, [c.range for t in plan.tensors for c in t.chunks], out)


def make_dcp(root: Path, layers: int, width: int = 2048) -> Path:
    """The FSDP2 DCP checkpoint of ``layers`` x Linear(width, width) with AdamW state (made once per folder)."""
    ckpt = root / f"dcp-{layers}"
    if not (ckpt / ".metadata").exists():
        script = root / "gen_dcp.py"
        script.write_text(GEN_DCP)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(script), str(ckpt), str(layers), str(width)], check=True)
        print(
            f"generated DCP checkpoint ({layers} x Linear({width}, {width})) in {time.perf_counter() - t0:.0f}s"
        )
    return ckpt


def bench_dcp(root: Path, layers: int, width: int = 2048) -> None:
    ckpt = make_dcp(root, layers, width)
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    plan = plan_source(Location.from_url(str(ckpt)))
    params = sum(t.numel for t in plan.tensors)
    print(f"DCP: {params / 1e6:.1f}M model parameters, {size / 1e9:.2f} GB on disk (model + AdamW)")
    ours_out, ref_pt, ref_out = root / "ours-dcp.safetensors", root / "ref.pt", root / "ref-dcp.safetensors"
    evict(ckpt)
    ours, ours_rss = timed(
        [sys.executable, "-m", "ckptctl", "consolidate", str(ckpt), str(ours_out), "--force", "--quiet"]
    )
    evict(ckpt)
    script = root / "torch_convert.py"
    script.write_text(TORCH_CONVERT)
    theirs, theirs_rss = timed([sys.executable, str(script), str(ckpt), str(ref_pt), str(ref_out)])
    io_floor = dcp_floor(ckpt, root / "floor.bin")
    same = tensor_hashes(ours_out) == tensor_hashes(ref_out)
    print(f"  ckptctl                     {ours:6.2f}s  peak RSS {ours_rss:6d} MB")
    print(f"  dcp_to_torch_save + save    {theirs:6.2f}s  peak RSS {theirs_rss:6d} MB")
    print(f"  I/O floor                   {io_floor:6.2f}s  (model chunks read + write + fsync, in-process)")
    print(
        f"  ratios: ckptctl/floor {ours / io_floor:.2f}x (goal <= 1.5x); torch/ckptctl {theirs / ours:.2f}x faster "
        f"(goal >= 3x); RSS ckptctl/torch {ours_rss / theirs_rss:.2f} (goal <= 0.2); outputs identical: {same}"
    )
    for path in (ours_out, ref_pt, ref_out, root / "floor.bin"):
        path.unlink(missing_ok=True)


REMOTE_YARDSTICK = """
import sys, boto3
from pathlib import Path
endpoint, bucket, prefix, local, out_key, workdir = sys.argv[1:7]
client = boto3.client("s3", endpoint_url=endpoint)
stage = Path(workdir) / "staged"
for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
    for item in page.get("Contents", []):
        target = stage / item["Key"][len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, item["Key"], str(target))
import subprocess
out = Path(workdir) / "converted.safetensors"
subprocess.run([sys.executable, "-m", "ckptctl", "consolidate", str(stage), str(out), "--force", "--quiet"], check=True)
client.upload_file(str(out), bucket, out_key)
"""


def bench_remote(root: Path, server_name: str, layers: int = 20) -> None:
    """SRC, OUT and both on an S3 server (moto, or Ceph RGW with ``--server rgw``) against what users do without
    ckptctl's streaming: download the folder with boto3, convert it locally, upload the result with boto3."""
    import boto3

    ckpt = make_dcp(root, layers)
    if server_name == "rgw":
        from bench.tier import Rgw

        server = Rgw()
    else:
        from tests.conftest import start_moto

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        server = start_moto()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        client = boto3.client("s3", endpoint_url=server.endpoint)
        client.create_bucket(Bucket="bench")
        for path in sorted(ckpt.iterdir()):
            client.upload_file(str(path), "bench", f"dcp/{path.name}")
        src, local_out = "s3://bench/dcp", root / "remote-ours.safetensors"
        endpoint = ["-o", f"endpoint_url={server.endpoint}"]
        base = [sys.executable, "-m", "ckptctl", "consolidate"]
        rows = []
        evict(ckpt)
        rows.append(("local SRC, local OUT", timed([*base, str(ckpt), str(local_out), "--force", "--quiet"])))
        rows.append(
            ("s3 SRC, local OUT", timed([*base, src, str(local_out), "--force", "--quiet", *endpoint]))
        )
        evict(ckpt)
        rows.append(
            (
                "local SRC, s3 OUT",
                timed(
                    [*base, str(ckpt), "s3://bench/out1/model.safetensors", "--force", "--quiet", *endpoint]
                ),
            )
        )
        rows.append(
            (
                "s3 SRC, s3 OUT",
                timed([*base, src, "s3://bench/out2/model.safetensors", "--force", "--quiet", *endpoint]),
            )
        )
        script = root / "remote_yardstick.py"
        script.write_text(REMOTE_YARDSTICK)
        work = root / "yardstick"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        yardstick = timed(
            [
                sys.executable,
                str(script),
                server.endpoint,
                "bench",
                "dcp",
                str(ckpt),
                "out3/model.safetensors",
                str(work),
            ]
        )
        shutil.rmtree(work, ignore_errors=True)
        same = all(
            client.get_object(Bucket="bench", Key=f"{key}/model.safetensors")["Body"].read()
            == local_out.read_bytes()
            for key in ("out1", "out2", "out3")
        )
        print(f"DCP on {server_name} ({layers} layers): consolidate with SRC and/or OUT on the store")
        for title, (wall, rss) in rows:
            print(f"  ckptctl {title:22s} {wall:6.2f}s  peak RSS {rss:6d} MB")
        wall, rss = yardstick
        print(f"  boto3 download + ckptctl + boto3 upload {wall:6.2f}s  peak RSS {rss:6d} MB  (no streaming)")
        print(
            f"  ratios: s3->s3 streamed / download+convert+upload {rows[3][1][0] / wall:.2f}x; "
            f"s3->s3 / local->local {rows[3][1][0] / rows[0][1][0]:.2f}x; outputs identical: {same}"
        )
        local_out.unlink(missing_ok=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--ds-python", help="a python with deepspeed==0.19.8 and torch (else a scratch venv is made)"
    )
    parser.add_argument("--keep", help="work in this folder and keep it")
    parser.add_argument("--case", choices=("zero", "dcp", "remote", "all"), default="all")
    parser.add_argument(
        "--server", choices=("moto", "rgw"), default="moto", help="the S3 server of --case remote"
    )
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="ckptctl-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.case in ("dcp", "all"):
            for layers in (20, 40):
                bench_dcp(root, layers)
        if args.case in ("remote", "all"):
            bench_remote(root, args.server)
        if args.case in ("dcp", "remote"):
            return
        ds_python = Path(args.ds_python) if args.ds_python else scratch_deepspeed(root)
        torchrun = ds_python.parent / "torchrun"
        env = dict(os.environ, DS_ACCELERATOR="cpu")
        for stage in (2, 3):
            ckpt = root / f"z{stage}"
            if not (ckpt / "latest").exists():
                t0 = time.perf_counter()
                subprocess.run(
                    [
                        str(torchrun),
                        "--standalone",
                        "--nproc_per_node",
                        "2",
                        str(GEN),
                        "--stage",
                        str(stage),
                        "--dtype",
                        "bf16",
                        "--out",
                        str(ckpt),
                        *MODEL,
                    ],
                    check=True,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                print(f"generated stage {stage} checkpoint in {time.perf_counter() - t0:.0f}s")
            size = sum(p.stat().st_size for p in ckpt.rglob("*.pt"))
            plan = plan_zero(Location.from_url(str(ckpt)))
            params = sum(t.numel for t in plan.tensors)
            print(f"stage {stage}: {params / 1e6:.1f}M parameters, {size / 1e9:.2f} GB of .pt files")
            ours_out, ref_out = root / f"ours{stage}.safetensors", root / f"ref{stage}"
            evict(ckpt)
            ours, ours_rss = timed(
                [
                    sys.executable,
                    "-m",
                    "ckptctl",
                    "consolidate",
                    str(ckpt),
                    str(ours_out),
                    "--force",
                    "--quiet",
                ]
            )
            evict(ckpt)
            shutil.rmtree(ref_out, ignore_errors=True)
            theirs, theirs_rss = timed(
                [
                    str(ds_python),
                    str(ckpt / "zero_to_fp32.py"),
                    str(ckpt),
                    str(ref_out),
                    "--safe_serialization",
                ],
                env=env,
            )
            io_floor = floor(ckpt, root / "floor.bin")
            reference = {}
            for shard in sorted(ref_out.glob("*.safetensors")):
                reference.update(tensor_hashes(shard))
            same = tensor_hashes(ours_out) == reference
            print(f"  ckptctl       {ours:6.2f}s  peak RSS {ours_rss:6d} MB")
            print(f"  zero_to_fp32  {theirs:6.2f}s  peak RSS {theirs_rss:6d} MB")
            print(f"  I/O floor     {io_floor:6.2f}s  (fp32 master ranges read + write + fsync, in-process)")
            print(
                f"  ratios: ckptctl/floor {ours / io_floor:.2f}x (goal <= 1.5x); zero_to_fp32/ckptctl "
                f"{theirs / ours:.2f}x faster (goal >= 2.5x); RSS ckptctl/zero_to_fp32 {ours_rss / theirs_rss:.2f} "
                f"(goal <= 0.25); outputs identical: {same}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
