"""Plain records the format readers return, and the one dtype table they share.

Dtypes are named as torch names them (``float32``, ``bfloat16``) whatever the file format calls them, so a
safetensors file, a torch archive and a DCP checkpoint of the same model read the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ckptctl.errors import IntegrityError

# The one dtype table: torch dtype name -> (bits per element as the shape counts elements, safetensors code,
# little-endian numpy code). Every reader and writer derives its own view from it.
DTYPES: dict[str, tuple[int, str | None, str | None]] = {
    "float64": (64, "F64", "<f8"),
    "float32": (32, "F32", "<f4"),
    "float16": (16, "F16", "<f2"),
    "bfloat16": (16, "BF16", None),  # numpy has none: widened to float32 by shifting the bits
    "complex128": (128, None, "<c16"),
    "complex64": (64, "C64", "<c8"),
    "complex32": (32, None, None),
    "int64": (64, "I64", "<i8"),
    "int32": (32, "I32", "<i4"),
    "int16": (16, "I16", "<i2"),
    "int8": (8, "I8", "i1"),
    "uint64": (64, "U64", "<u8"),
    "uint32": (32, "U32", "<u4"),
    "uint16": (16, "U16", "<u2"),
    "uint8": (8, "U8", "u1"),
    "bool": (8, "BOOL", "?"),
    "float8_e4m3fn": (8, "F8_E4M3", None),
    "float8_e5m2": (8, "F8_E5M2", None),
    "float8_e4m3fnuz": (8, "F8_E4M3FNUZ", None),
    "float8_e5m2fnuz": (8, "F8_E5M2FNUZ", None),
    "float8_e8m0fnu": (8, "F8_E8M0", None),
    "float4_e2m1fn_x2": (8, None, None),
    # safetensors "F4": the shape counts 4-bit elements (two per byte).
    "float4_e2m1": (4, "F4", None),
    "qint8": (8, None, None),
    "quint8": (8, None, None),
    "qint32": (32, None, None),
    "quint4x2": (8, None, None),
    "quint2x4": (8, None, None),
}
DTYPE_BITS: dict[str, int] = {name: bits for name, (bits, _, _) in DTYPES.items()}
SAFETENSORS_CODE: dict[str, str] = {name: code for name, (_, code, _) in DTYPES.items() if code}
"""torch dtype name -> the safetensors header's code (``float32`` -> ``F32``)."""
SAFETENSORS_DTYPE: dict[str, str] = {code: name for name, code in SAFETENSORS_CODE.items()}
"""The safetensors header's code -> torch dtype name."""
NUMPY_CODE: dict[str, str] = {name: code for name, (_, _, code) in DTYPES.items() if code}
"""torch dtype name -> the little-endian numpy dtype that holds the same bytes."""

FLOATING = {name for name in DTYPE_BITS if name.startswith(("float", "bfloat", "complex"))}


# Dimensions, strides, offsets and element counts read from a file must stay below this: no real tensor is
# larger, and numbers of thousands of digits would break every renderer (str() of an int is capped).
MAX_DIMENSION = 2**63


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def checked_shape(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a shape: at most 64 non-negative ints below MAX_DIMENSION whose product is too; else an
    IntegrityError naming ``what`` (a tensor of a crafted or damaged file)."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) > 64
        or not all(type(d) is int and 0 <= d < MAX_DIMENSION for d in value)
        or math.prod(value) >= MAX_DIMENSION
    ):
        raise IntegrityError(f"{what} has an invalid shape {plain_value(value)!s:.80}")
    return tuple(value)


_MAX_INT_BITS = 13_000  # about 3,900 digits: below Python's 4,300-digit limit on int -> str
_MAX_NESTING = 24


def plain_value(value: Any, depth: int = 0) -> Any:
    """A JSON- and terminal-safe copy of a value read from a file: ints too long for ``str()`` become text,
    nesting is cut at ``_MAX_NESTING`` levels, tuples become lists, and records become their short text."""
    if value is None or isinstance(value, (bool, float, str)):
        return value
    if isinstance(value, int):
        bits = value.bit_length()
        return value if bits <= _MAX_INT_BITS else f"<integer of {bits:,} bits>"
    if depth >= _MAX_NESTING:
        return "<nested too deeply>"
    if isinstance(value, dict):
        return {str(plain_value(k, depth + 1)): plain_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value):,} bytes>"
    return repr(value)


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
    master copies), ``scheduler``, ``rng`` (random number generator state), ``other`` (training state outside
    the model). Only ``param`` and ``frozen`` count as parameters."""
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
    truncated: bool = False
    """True when the defect proves the file was cut short (a size or trailer check), not merely damaged: only
    then may a catalog call the checkpoint incomplete."""

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

    def __post_init__(self) -> None:
        # Values come from pickles and JSON headers of untrusted files: make them safe to render once, here.
        object.__setattr__(self, "metadata", plain_value(self.metadata))
        object.__setattr__(self, "facts", plain_value(self.facts))

    @property
    def complete(self) -> bool:
        return not self.defects

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors if t.counts_as_parameter)

    def totals(self) -> dict[str, Any]:
        """Parameter count and tensor bytes, overall, by dtype and by role (aliases are counted once)."""
        by_dtype: dict[str, dict[str, int]] = {}
        by_role: dict[str, dict[str, int]] = {}
        for tensor in self.tensors:
            if tensor.alias_of is not None:
                continue
            for table, key in ((by_dtype, tensor.dtype), (by_role, tensor.role)):
                entry = table.setdefault(key, {"tensors": 0, "elements": 0, "bytes": 0})
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
            "by_role": dict(sorted(by_role.items())),
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
