"""Plain records the format readers return, and the one dtype table they share.

Dtypes are named as torch names them (``float32``, ``bfloat16``) whatever the file format calls them, so a
safetensors file, a torch archive and a DCP checkpoint of the same model read the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# torch dtype name -> bits per element (as the shape counts elements).
DTYPE_BITS: dict[str, int] = {
    "float64": 64,
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
    "complex128": 128,
    "complex64": 64,
    "complex32": 32,
    "int64": 64,
    "int32": 32,
    "int16": 16,
    "int8": 8,
    "uint64": 64,
    "uint32": 32,
    "uint16": 16,
    "uint8": 8,
    "bool": 8,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
    "float8_e4m3fnuz": 8,
    "float8_e5m2fnuz": 8,
    "float8_e8m0fnu": 8,
    "float4_e2m1fn_x2": 8,
    # safetensors "F4": the shape counts 4-bit elements (two per byte).
    "float4_e2m1": 4,
    "qint8": 8,
    "quint8": 8,
    "qint32": 32,
    "quint4x2": 8,
    "quint2x4": 8,
}

FLOATING = {name for name in DTYPE_BITS if name.startswith(("float", "bfloat", "complex"))}


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a C-contiguous tensor of this dtype and shape occupies (F4 packs two elements per byte)."""
    return (numel_of(shape) * DTYPE_BITS[dtype] + 7) // 8


@dataclass(frozen=True)
class TensorInfo:
    """One named tensor as a checkpoint declares it; nothing here needs the tensor's data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    role: str = "param"
    """``param``, ``frozen`` (a parameter that does not train), ``buffer``, ``optimizer`` (optimizer state or
    master copies), ``other`` (training state outside the model)."""
    alias_of: str | None = None
    """Set when this name is the same tensor as an earlier one (tied weights): not counted twice."""
    file: str | None = None

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def counts_as_parameter(self) -> bool:
        return self.alias_of is None and self.role in ("param", "frozen")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "bytes": self.nbytes,
            "role": self.role,
        }
        if self.alias_of is not None:
            data["alias_of"] = self.alias_of
        if self.file is not None:
            data["file"] = self.file
        return data


@dataclass(frozen=True)
class Defect:
    """Something structurally wrong with one file (or a file that should be there and is not)."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" if self.file else self.message

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "message": self.message}


@dataclass(frozen=True)
class FileFact:
    path: str
    size: int
    role: str
    """What the file is to the checkpoint: ``weights``, ``index``, ``config``, ``rank``, ``metadata``..."""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "role": self.role}


@dataclass(frozen=True)
class Inspection:
    """What a checkpoint holds, read from its headers: the result of ``ckptctl inspect``."""

    url: str
    format: str
    files: tuple[FileFact, ...]
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    """Format-specific facts: ``zero`` (stage, world size...), ``dcp`` (chunks, files), ``peft`` (r, alpha...)."""
    defects: tuple[Defect, ...] = ()
    notes: tuple[str, ...] = ()
    verified: bool = False
    """True when every structural check ran (``--verify``), not only the cheap ones."""

    @property
    def complete(self) -> bool:
        return not self.defects

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors if t.counts_as_parameter)

    def totals(self) -> dict[str, Any]:
        """Parameter count and tensor bytes, overall and by dtype (aliases are counted once)."""
        by_dtype: dict[str, dict[str, int]] = {}
        for tensor in self.tensors:
            if tensor.alias_of is not None:
                continue
            entry = by_dtype.setdefault(tensor.dtype, {"tensors": 0, "elements": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["elements"] += tensor.numel
            entry["bytes"] += tensor.nbytes
        return {
            "tensors": len(self.tensors),
            "parameters": self.parameters,
            "trainable_parameters": sum(
                t.numel for t in self.tensors if t.alias_of is None and t.role == "param"
            ),
            "tensor_bytes": sum(e["bytes"] for e in by_dtype.values()),
            "file_bytes": sum(f.size for f in self.files),
            "by_dtype": dict(sorted(by_dtype.items())),
        }

    def to_dict(self, *, tensor_filter: Any = None) -> dict[str, Any]:
        tensors = [t for t in self.tensors if tensor_filter is None or tensor_filter(t.name)]
        return {
            "url": self.url,
            "format": self.format,
            "complete": self.complete,
            "verified": self.verified,
            "defects": [d.to_dict() for d in self.defects],
            "totals": self.totals(),
            "files": [f.to_dict() for f in self.files],
            "tensors": [t.to_dict() for t in tensors],
            "metadata": self.metadata,
            "facts": self.facts,
            "notes": list(self.notes),
        }
