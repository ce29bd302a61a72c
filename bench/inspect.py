"""``ckptctl inspect`` against the usual ways of asking "what is in this checkpoint?", on ~1 GB files.

Makes a Llama-shaped bf16 state dict (~1 GB, a few hundred tensors) as ``model.safetensors`` and as a torch
``model.pt`` in a temporary folder (deleted afterwards), then measures, each in a fresh process (median of 3):
wall time, the operation's own time (imports excluded) and peak RSS, for ``ckptctl inspect``,
``safetensors.safe_open`` (keys + shapes + dtypes) and ``torch.load(weights_only=True, mmap=True)``. Then, over
S3 (moto on 127.0.0.1), requests (from moto's access log) and bytes fetched per file, against s3fs ``open()``
plus reading the header. Goals (issue 4): local ≤ 5 ms per safetensors and ≤ 10 ms per .pt beyond interpreter
start, no torch import; over S3 ≤ 3 requests and ≤ 64 KiB per file when the header is smaller than that.
Usage: python bench/inspect.py [LAYERS]   (default 34 layers of hidden 1024: ~1.05 GB, 309 tensors)
"""

from __future__ import annotations

import sys

# This file is named like the stdlib ``inspect`` module (the issue names it): drop its folder from the path
# before anything imports ``inspect``; hence the imports below this line (ruff: noqa E402 for this file).
sys.path[:] = [
    p
    for p in sys.path
    if p not in ("", __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
]

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from tests.conftest import start_moto


def _bench_list() -> Any:
    """bench/list.py's moto access-log counter (one piece of code counts requests for every bench)."""
    spec = importlib.util.spec_from_file_location("bench_list", ROOT / "bench" / "list.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_requests_since(log: Path, start: int) -> Any:
    """moto colours the request line of non-200 answers (a ranged GET is 206) with ANSI codes, which
    bench/list.py's pattern does not expect: count on a copy of the new log lines without them."""
    with log.open("rb") as handle:
        handle.seek(start)
        text = re.sub(rb"\x1b\[[0-9;]*m", b"", handle.read())
    with tempfile.NamedTemporaryFile(suffix=".log") as plain:
        plain.write(text)
        plain.flush()
        return _bench_list().count_requests(Path(plain.name), 0)


def make_files(folder: Path, layers: int) -> tuple[Path, Path, int]:
    """A Llama-shaped bf16 state dict (uninitialised data: only the layout matters) saved both ways."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab = 1024, 2816, 32000
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    state = {name: torch.empty(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}
    st, pt = folder / "model.safetensors", folder / "model.pt"
    save_file(state, str(st), metadata={"format": "pt"})
    torch.save(state, pt)
    return st, pt, len(state)


# Peak RSS is read from /proc/self/status VmHWM: ru_maxrss would include the parent's size before exec.
CHILD = """
import json, sys, time
path = sys.argv[1]
t0 = time.perf_counter()
{body}
op = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"op_ms": op * 1000, "tensors": n, "torch": "torch" in sys.modules, "rss_mb": hwm / 1024}}))
"""
CLI_BODY = (
    "import io, contextlib\nfrom ckptctl.cli.app import main\nsys.argv = ['ckptctl', 'inspect', path, '--json']\n"
    "t0 = time.perf_counter()\nbuffer = io.StringIO()\n"
    "with contextlib.redirect_stdout(buffer):\n    try:\n        main()\n    except SystemExit:\n        pass\n"
    "n = json.loads(buffer.getvalue())['data']['totals']['tensors']"
)
VARIANTS = {
    "ckptctl inspect (core)": (
        "from ckptctl.inspect import inspect_checkpoint\n"
        "t0 = time.perf_counter()\nn = len(inspect_checkpoint(path).tensors)"
    ),
    "safe_open numpy keys+shapes": (
        "from safetensors import safe_open\nt0 = time.perf_counter()\nn = 0\n"
        "with safe_open(path, framework='numpy') as f:\n"
        "    for k in f.keys():\n        s = f.get_slice(k); s.get_shape(); s.get_dtype(); n += 1"
    ),
    "torch.load(weights_only, mmap)": (
        "import torch\nt0 = time.perf_counter()\n"
        "n = len(torch.load(path, weights_only=True, mmap=True, map_location='cpu'))"
    ),
}


def run_measured(argv: list[str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one fresh process and the facts it printed about itself."""
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
    return time.perf_counter() - t0, json.loads(done.stdout.strip().splitlines()[-1])


def median_of(body: str, path: Path, repeat: int = 3) -> dict[str, Any]:
    runs = [run_measured([sys.executable, "-c", CHILD.format(body=body), str(path)]) for _ in range(repeat)]
    return {
        "wall_s": statistics.median(r[0] for r in runs),
        "op_ms": statistics.median(r[1]["op_ms"] for r in runs),
        "rss_mb": statistics.median(r[1]["rss_mb"] for r in runs),
        "tensors": runs[-1][1]["tensors"],
        "torch": runs[-1][1]["torch"],
    }


def local_section(st: Path, pt: Path) -> None:
    base = median_of("n = 0", st)
    print(f"interpreter start: {base['wall_s'] * 1000:.0f} ms, {base['rss_mb']:.1f} MB peak RSS")
    print(
        f"{'file':<18} {'method':<32} {'op ms':>9} {'wall ms':>9} {'peak RSS MB':>12} {'torch?':>7} tensors"
    )
    variants = {**VARIANTS, "ckptctl inspect --json (CLI main)": CLI_BODY}
    for path in (st, pt):
        found: dict[str, dict[str, Any]] = {}
        for label, body in variants.items():
            if label.startswith("safe_open") and path.suffix != ".safetensors":
                continue
            m = found[label] = median_of(body, path)
            print(
                f"{path.name:<18} {label:<32} {m['op_ms']:>9.2f} {m['wall_s'] * 1000:>9.0f} "
                f"{m['rss_mb']:>12.1f} {m['torch']!s:>7} {m['tensors']}"
            )
        ours = found["ckptctl inspect (core)"]
        for label, other in found.items():
            if label.startswith("ckptctl"):
                continue
            print(
                f"  ratio ckptctl/{label}: op {ours['op_ms'] / other['op_ms']:.3f}, "
                f"wall {ours['wall_s'] / other['wall_s']:.3f}, peak RSS {ours['rss_mb'] / other['rss_mb']:.3f}"
            )
        print(
            f"  ckptctl beyond interpreter start: op {ours['op_ms']:.2f} ms; process {ours['wall_s'] * 1000:.0f} ms "
            f"- {base['wall_s'] * 1000:.0f} ms = {(ours['wall_s'] - base['wall_s']) * 1000:.0f} ms (imports included)"
        )


def s3_section(st: Path, pt: Path) -> None:
    import s3fs

    from ckptctl.formats.safetensors_header import read_safetensors_header
    from ckptctl.formats.source import FileSource
    from ckptctl.formats.torch_zip import read_torch_archive
    from ckptctl.inspect import inspect_checkpoint
    from ckptctl.storage.location import Location

    server = start_moto()
    try:
        assert server.log is not None
        options = {"endpoint_url": server.endpoint}
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        t0 = time.perf_counter()
        for path in (st, pt):
            fs.put_file(str(path), f"bench/{path.name}")
        print(f"\nS3 (moto): uploaded 2 files in {time.perf_counter() - t0:.1f}s")
        print(f"{'file':<18} {'method':<40} {'requests':>9} {'by kind':<24} {'bytes':>12} {'seconds':>8}")

        def measure(label: str, name: str, action: Any) -> tuple[int, int | None]:
            time.sleep(0.3)
            mark = server.log.stat().st_size  # type: ignore[union-attr]
            t0 = time.perf_counter()
            fetched = action()
            seconds = time.perf_counter() - t0
            time.sleep(0.3)
            kinds = count_requests_since(server.log, mark)  # type: ignore[arg-type]
            print(
                f"{name:<18} {label:<40} {sum(kinds.values()):>9} {json.dumps(dict(kinds)):<24} "
                f"{fetched if fetched is not None else '-':>12} {seconds:>8.2f}"
            )
            return sum(kinds.values()), fetched

        bench = Location.from_url("s3://bench", options)
        for path in (st, pt):
            size = path.stat().st_size
            reader = read_safetensors_header if path.suffix == ".safetensors" else read_torch_archive

            def header_only(path: Path = path, size: int = size, reader: Any = reader) -> int:
                source = FileSource(bench, path.name, size)
                reader(source)
                return source.bytes_fetched

            requests, fetched = measure("ckptctl reader (size from the listing)", path.name, header_only)
            measure(
                "ckptctl inspect URL (HEAD + reader)",
                path.name,
                lambda path=path: (
                    inspect_checkpoint(f"s3://bench/{path.name}", storage_options=options) and None
                ),
            )

            def s3fs_open(path: Path = path) -> int:
                other = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
                with other.open(f"bench/{path.name}", "rb") as handle:
                    if path.suffix == ".safetensors":
                        length = int.from_bytes(handle.read(8), "little")
                        json.loads(handle.read(length))
                    else:
                        archive = zipfile.ZipFile(handle)
                        archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
                    return int(handle.cache.total_requested_bytes)

            other_requests, other_fetched = measure("s3fs open() default + read header", path.name, s3fs_open)
            assert fetched and other_fetched
            print(
                f"  ratio ckptctl/s3fs open(): bytes {fetched / other_fetched:.5f}; requests "
                f"{requests + 1}/{other_requests} with the HEAD an URL argument costs"
            )
    finally:
        server.stop()


def main() -> None:
    if sys.argv[1:2] == ["--make"]:
        # In a child process, so that this one never imports torch (and stays small for the measurements).
        print(make_files(Path(sys.argv[2]), int(sys.argv[3]))[2])
        return
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 34
    folder = Path(tempfile.mkdtemp(prefix="ckptctl-bench-"))
    try:
        t0 = time.perf_counter()
        made = subprocess.run(
            [sys.executable, __file__, "--make", str(folder), str(layers)],
            capture_output=True,
            text=True,
            check=True,
        )
        st, pt, count = folder / "model.safetensors", folder / "model.pt", int(made.stdout.split()[-1])
        print(
            f"made {st.name} {st.stat().st_size / 1e9:.3f} GB and {pt.name} {pt.stat().st_size / 1e9:.3f} GB, "
            f"{count} bf16 tensors, in {time.perf_counter() - t0:.1f}s"
        )
        local_section(st, pt)
        s3_section(st, pt)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
