"""Any state dict as ``name -> TensorSource``: safetensors files (single or HF-sharded), torch zip archives, and
DeepSpeed ZeRO saves, each tensor readable on its own by byte ranges.

Only headers and (restricted) pickles are read to build the table; a tensor's bytes are fetched when asked for,
so picking the 2 MB of LoRA tensors out of a 14 GB checkpoint reads 2 MB. No torch, no unpickling of code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ckptctl.errors import IntegrityError, NotFoundError, TruncatedError, UsageError
from ckptctl.formats.model import DTYPE_BITS, Defect
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import FileSource
from ckptctl.formats.tensor_layout import Chunk, Range, is_contiguous
from ckptctl.formats.torch_zip import TorchArchive, read_torch_archive
from ckptctl.storage.location import FileEntry, Location

READ_CHUNK_BYTES = 64 * 2**20
_NUMPY = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class TensorSource:
    """One tensor of a checkpoint: its dtype and shape, and where its bytes are (concatenated, cut to size)."""

    location: Location
    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[Range, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_BITS[self.dtype] // 8

    def chunks(self) -> Iterator[bytes]:
        """The tensor's bytes in chunks of at most 64 MiB; a short read is an IntegrityError (truncated file)."""
        remaining = self.nbytes
        for item in self.ranges:
            start = item.start
            while start < item.end and remaining > 0:
                end = min(item.end, start + READ_CHUNK_BYTES, start + remaining)
                data = self.location.read_range(item.rel, start, end)
                if len(data) != end - start:
                    raise IntegrityError(
                        f"{self.location.url_of(item.rel)} is truncated (tensor {self.name})",
                        url=self.location.url_of(item.rel),
                    )
                remaining -= len(data)
                start = end
                yield data
        if remaining:
            rel = self.ranges[0].rel if self.ranges else self.name
            raise IntegrityError(f"{self.location.url_of(rel)} is truncated (tensor {self.name})")

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def array(self) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 widened exactly to float32)."""
        data = self.read()
        if self.dtype == "bfloat16":
            halves = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
            return halves.view(np.float32).reshape(self.shape)
        if self.dtype not in _NUMPY:
            raise UsageError(f"tensor {self.name}: dtype {self.dtype} is not supported here")
        return np.frombuffer(data, dtype=_NUMPY[self.dtype]).reshape(self.shape)


def slab_ranges(shape: tuple[int, ...], chunks: tuple[Chunk, ...]) -> tuple[Range, ...] | None:
    """The chunks as one concatenation in C order when each is whole in every dimension but the first (FSDP's
    ``Shard(0)``, 1-d and 0-d tensors, a single chunk), sorted by offset; None for other layouts (``Shard(1)``).
    The chunks must already be known to tile the tensor."""
    if any(c.offsets[1:] != (0,) * (len(shape) - 1) or c.sizes[1:] != shape[1:] for c in chunks):
        return None
    return tuple(c.range for c in sorted(chunks, key=lambda c: c.offsets[:1]))


def assemble_chunks(
    location: Location, name: str, dtype: str, shape: tuple[int, ...], chunks: tuple[Chunk, ...]
) -> Iterator[bytes]:
    """A tensor's bytes in C order from chunks that tile it (checked by the format reader).

    Slabs of the first dimension stream straight from the files in bounded pieces; any other tiling is
    assembled in memory, so it costs about twice the tensor's size (one tensor at a time).
    """
    ranges = slab_ranges(shape, chunks)
    if ranges is not None:
        yield from TensorSource(location, name, dtype, shape, ranges).chunks()
        return
    bits = DTYPE_BITS[dtype]
    if bits % 8:
        raise UsageError(f"tensor {name}: {dtype} chunks split across dimensions cannot be assembled here")
    item = bits // 8
    # Every byte is overwritten: the chunks tile the tensor.
    out = np.empty((*shape[:-1], shape[-1] * item), dtype=np.uint8)
    for chunk in chunks:
        data = TensorSource(location, name, dtype, chunk.sizes, (chunk.range,)).read()
        block = np.frombuffer(data, dtype=np.uint8).reshape(*chunk.sizes[:-1], chunk.sizes[-1] * item)
        index = tuple(slice(o, o + n) for o, n in zip(chunk.offsets[:-1], chunk.sizes[:-1], strict=True))
        last = slice(chunk.offsets[-1] * item, (chunk.offsets[-1] + chunk.sizes[-1]) * item)
        where = (*index, last)
        out[where] = block
    yield out.tobytes()


def _refuse_defects(location: Location, rel: str, defects: list[Defect] | tuple[Defect, ...]) -> None:
    """A file whose own structure proves it cut or damaged is refused whole, even when the tensors wanted lie
    outside the damage: a conversion never turns a corrupt checkpoint into a clean-looking output."""
    if not defects:
        return
    url = location.url_of(rel)
    error = TruncatedError if any(d.truncated for d in defects) else IntegrityError
    more = f" (and {len(defects) - 1} more)" if len(defects) > 1 else ""
    raise error(
        f"{url}: {defects[0].message}{more}",
        url=url,
        hint=f"ckptctl inspect --verify {url} lists every defect",
    )


def _safetensors(location: Location, rel: str, size: int) -> dict[str, TensorSource]:
    header = read_safetensors_header(FileSource(location, rel, size))
    _refuse_defects(location, rel, header.defects)
    return {
        t.name: TensorSource(location, t.name, t.dtype, t.shape, (Range(rel, *header.spans[t.name]),))
        for t in header.tensors
    }


def _torch(location: Location, rel: str, size: int) -> dict[str, TensorSource]:
    archive: TorchArchive = read_torch_archive(FileSource(location, rel, size))
    _refuse_defects(location, rel, archive.check_members())
    found: dict[str, TensorSource] = {}
    for record in archive.tensors:
        if not is_contiguous(record.shape, record.stride):
            raise IntegrityError(f"{location.url_of(rel)}: tensor {record.name} is not contiguous")
        start = archive.tensor_byte_offset(record)
        end = start + record.numel * record.itemsize
        found[record.name] = TensorSource(
            location, record.name, record.dtype, record.shape, (Range(rel, start, end),)
        )
    return found


def open_file(location: Location, rel: str, size: int) -> dict[str, TensorSource]:
    """A state dict file by its content: safetensors, or a torch zip archive (``.pt``, ``.bin``, ``.pth``)."""
    head = location.read_range(rel, 0, 4)
    if head.startswith(b"PK"):
        return _torch(location, rel, size)
    return _safetensors(location, rel, size)


def looks_like_deepspeed(entries: list[FileEntry]) -> bool:
    """A DeepSpeed save or tag folder: model states, or the ``latest`` pointer."""
    return any(e.path.endswith("model_states.pt") for e in entries) or any(
        e.path == "latest" for e in entries
    )


def open_deepspeed(location: Location) -> dict[str, TensorSource]:
    """A DeepSpeed ZeRO save through consolidate's planner: each parameter as ranges of the fp32 partitions."""
    from ckptctl.convert.consolidate import plan_consolidation

    plan = plan_consolidation(location)
    found: dict[str, TensorSource] = {}
    for tensor in plan.tensors:
        ranges = tuple(Range(p.rel, p.start, p.end) for p in tensor.pieces)
        found[tensor.name] = TensorSource(location, tensor.name, tensor.dtype, tensor.shape, ranges)
    return found


def _weight_map(location: Location, index_name: str) -> dict[str, str]:
    """An HF shard index's ``weight_map`` (tensor -> shard file in this folder); IntegrityError when it is not
    JSON of that shape."""
    try:
        weight_map = json.loads(location.read_bytes(index_name)).get("weight_map")
    except (ValueError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for k, v in weight_map.items()
    ):
        raise IntegrityError(
            f"{location.url_of(index_name)}: not a shard index (no weight_map of file names)"
        )
    return weight_map


WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.pt",
    "full_state_dict.safetensors",
    "full_state_dict.pt",
)


def open_state_dict(location: Location) -> tuple[dict[str, TensorSource], str]:
    """Open SRC (a file, or a folder: HF sharded/single weights, a DeepSpeed save, an HF ``checkpoint-N`` holding
    one); returns the tensors and a description of what was opened."""
    entry = location.stat()
    if entry.type == "file":
        return open_file(location.parent(), location.name, entry.size), location.url
    entries = location.walk()
    files = {e.path: e for e in entries if e.type == "file"}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in files:
            weight_map = _weight_map(location, index_name)
            found: dict[str, TensorSource] = {}
            for shard in sorted(set(weight_map.values())):
                if shard not in files:
                    raise NotFoundError(f"{location.url_of(index_name)} names {shard}, which is missing")
                found.update(open_file(location, shard, files[shard].size))
            absent = next((n for n, shard in weight_map.items() if n not in found), None)
            if absent is not None:
                raise IntegrityError(
                    f"{location.url_of(index_name)}: tensor {absent!r} is not in {weight_map[absent]}",
                    url=location.url_of(weight_map[absent]),
                )
            return found, location.url_of(index_name)
    for name in WEIGHT_FILES:
        if name in files:
            return open_file(location, name, files[name].size), location.url_of(name)
    if looks_like_deepspeed(entries):
        return open_deepspeed(location), location.url
    candidates = sorted(
        p for p in files if "/" not in p and p.endswith((".safetensors", ".pt", ".bin", ".pth"))
    )
    if len(candidates) == 1:
        return open_file(location, candidates[0], files[candidates[0]].size), location.url_of(candidates[0])
    raise NotFoundError(
        f"no state dict found in {location.url} (looked for model.safetensors, pytorch_model.bin, a shard index, "
        "a DeepSpeed save, or a single .safetensors/.pt file)",
        url=location.url,
    )
