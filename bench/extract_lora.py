"""``ckptctl extract-lora`` figures, with the data made at run time in a temporary folder.

Mode 2 (SVD): a Llama-shaped pair of 3 modules (gate/up 11008x4096, down 4096x11008, fp32); tuned = base + a
rank-16 delta + noise. Per module: seconds of ckptctl's randomized SVD vs ``torch.linalg.svd``, and the relative
error ‖ΔW − BA‖/‖ΔW‖ of both at the same rank (goal: ≤ 1.05x the exact error, ≥ 10x faster).
Mode 1 (checkpoint): a ~1 GB full state dict (``torch.save`` of a PeftModel-shaped dict: base weights + LoRA A/B).
ckptctl (reads only the LoRA tensors) vs ``torch.load`` (weights_only, then PEFT-style filtering and
save_file), each in its own process: wall seconds and peak RSS.

Usage: python bench/extract_lora.py [--modules N] [--skip-svd] [--skip-checkpoint]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import os
import shutil
import subprocess
import tempfile
import time

import torch
from safetensors.torch import save_file

RANK = 16


def make_pair(folder: Path, modules: int) -> list[str]:
    torch.manual_seed(0)
    shapes = [("gate_proj", (11008, 4096)), ("up_proj", (11008, 4096)), ("down_proj", (4096, 11008))][
        :modules
    ]
    base, tuned = {}, {}
    for leaf, shape in shapes:
        key = f"model.layers.0.mlp.{leaf}.weight"
        weight = torch.randn(shape) * 0.02
        delta = (torch.randn(shape[0], RANK) @ torch.randn(RANK, shape[1])) * 1e-3
        base[key] = weight
        tuned[key] = weight + delta + torch.randn(shape) * 1e-5
    (folder / "base").mkdir()
    (folder / "tuned").mkdir()
    save_file(base, str(folder / "base" / "model.safetensors"))
    save_file(tuned, str(folder / "tuned" / "model.safetensors"))
    return list(base)


def bench_svd(folder: Path, modules: int) -> None:
    from ckptctl.convert.lora_svd import extract_by_svd
    from ckptctl.formats.sources import open_state_dict
    from ckptctl.storage import Location

    keys = make_pair(folder, modules)
    result = extract_by_svd(
        Location.from_url(str(folder / "base")),
        Location.from_url(str(folder / "tuned")),
        str(folder / "out"),
        rank=RANK,
    )
    base, _ = open_state_dict(Location.from_url(str(folder / "base")))
    tuned, _ = open_state_dict(Location.from_url(str(folder / "tuned")))
    print(f"\n## mode 2: SVD at rank {RANK}, per module (fp32, 2 cores)")
    print(f"{'module':34s} {'shape':>12s} {'ckptctl s':>10s} {'linalg.svd s':>13s} {'speedup':>8s} "
          f"{'err ckptctl':>12s} {'err exact':>10s} {'ratio':>6s}")  # fmt: skip
    reports = {f"{r.module}.weight": r for r in result.modules}
    for key in keys:
        report = reports[key]
        delta = torch.from_numpy(tuned[key].array() - base[key].array())
        started = time.perf_counter()
        _, s, _ = torch.linalg.svd(delta, full_matrices=False)
        exact_seconds = time.perf_counter() - started
        # The same measure as ckptctl's: ‖ΔW − B A‖ / ‖ΔW‖ for the exact rank-RANK truncation.
        exact_error = float(torch.sqrt((s[RANK:].double() ** 2).sum() / (s.double() ** 2).sum()))
        print(
            f"{report.module:34s} {'x'.join(map(str, report.shape)):>12s} {report.seconds:10.2f} {exact_seconds:13.2f} "
            f"{exact_seconds / report.seconds:7.1f}x {report.relative_error:12.6f} {exact_error:10.6f} "
            f"{report.relative_error / exact_error:6.3f}"
        )
    print(f"adapter {result.adapter_bytes / 1e6:.1f} MB vs model {result.model_bytes / 1e6:.1f} MB")


CHILD_CKPTCTL = """
import sys, time
sys.path.insert(0, {root!r})
from ckptctl.convert.lora import extract_from_checkpoint
from ckptctl.storage import Location
t = time.perf_counter()
extract_from_checkpoint(Location.from_url({src!r}), {out!r}, overrides={{"lora_alpha": 16}})
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(time.perf_counter() - t, hwm)
"""

CHILD_TORCH = """
import sys, time
import torch
from safetensors.torch import save_file
t = time.perf_counter()
state = torch.load({src!r}, weights_only=True, mmap={mmap})
adapter = {{}}
for key, value in state.items():
    if ".lora_" in key:
        adapter[key.replace(".default", "")] = value.contiguous()
save_file(adapter, {out!r}, metadata={{"format": "pt"}})
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(time.perf_counter() - t, hwm)
"""


def bench_checkpoint(folder: Path) -> None:
    torch.manual_seed(0)
    state = {}
    for layer in range(16):
        for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = f"base_model.model.model.layers.{layer}.self_attn.{leaf}"
            state[f"{module}.base_layer.weight"] = torch.randn(2048, 2048)
            state[f"{module}.lora_A.default.weight"] = torch.randn(RANK, 2048)
            state[f"{module}.lora_B.default.weight"] = torch.randn(2048, RANK)
    src = folder / "full_state_dict.pt"
    torch.save(state, src)
    size = src.stat().st_size
    del state
    print(
        f"\n## mode 1: adapter out of a {size / 1e9:.2f} GB torch.save state dict (64 LoRA modules, r={RANK})"
    )
    runs = {
        "ckptctl extract-lora": CHILD_CKPTCTL.format(
            root=str(Path(__file__).resolve().parent.parent), src=str(src), out=str(folder / "o1")
        ),
        "torch.load + filter + save_file": CHILD_TORCH.format(
            src=str(src), out=str(folder / "o2.safetensors"), mmap=False
        ),
        "torch.load(mmap=True) + filter + save": CHILD_TORCH.format(
            src=str(src), out=str(folder / "o3.safetensors"), mmap=True
        ),
    }
    figures = {}
    print(
        f"{'method':40s} {'op s':>7s} {'process s':>10s} {'peak RSS':>10s}   (peak RSS = VmHWM of the process)"
    )
    for name, code in runs.items():
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - started
        seconds, rss_kb = out.split()
        figures[name] = (wall, int(rss_kb) / 1024)
        print(f"{name:40s} {float(seconds):7.3f} {wall:10.2f} {int(rss_kb) / 1024:6.0f} MiB")
    ours = figures["ckptctl extract-lora"]
    for name, (seconds, rss) in figures.items():
        if name != "ckptctl extract-lora":
            print(
                f"ratio vs {name}: process {seconds / ours[0]:.1f}x faster, {rss / ours[1]:.1f}x less peak memory"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modules", type=int, default=3)
    parser.add_argument("--skip-svd", action="store_true")
    parser.add_argument("--skip-checkpoint", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ckptctl-bench-lora-"))
    try:
        if not args.skip_checkpoint:
            bench_checkpoint(folder)
        if not args.skip_svd:
            bench_svd(folder, args.modules)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
