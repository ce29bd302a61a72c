"""The safetensors header: 8-byte little-endian length N, N bytes of JSON, then the data buffer.

The header alone says everything ``inspect`` needs, and validating it is also the cheap truncation check: the
data offsets must tile the buffer exactly, so a file cut anywhere is caught without reading its data. Read with
one speculative ranged GET (and a second only when the header is longer than the guess).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ckptctl.errors import IntegrityError, TruncatedError
from ckptctl.formats.model import (
    MAX_DIMENSION,
    SAFETENSORS_DTYPE,
    Defect,
    TensorInfo,
    checked_shape,
    nbytes_of,
    plain_value,
)
from ckptctl.formats.source import PROBE_BYTES, FileSource

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class SafetensorsHeader:
    header_length: int
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]
    defects: tuple[Defect, ...]
    """Problems found while validating (a truncated data buffer still lists its tensors)."""
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Each tensor's bytes [start, end) in the file (absolute offsets), for streaming reads."""


def _bad(source: FileSource, message: str) -> IntegrityError:
    return IntegrityError(f"{source.name}: {message}", url=source.location.url_of(source.rel))


def _truncated(source: FileSource, message: str) -> TruncatedError:
    return TruncatedError(f"{source.name}: {message}", url=source.location.url_of(source.rel))


def read_safetensors_header(source: FileSource) -> SafetensorsHeader:
    """Parse and validate a safetensors header without touching tensor data.

    Raises IntegrityError when there is no usable header (empty, cut inside the header, length past the end,
    not JSON). Defects of the data buffer (cut short, holes, overlaps, spans that disagree with the shape)
    are returned in ``defects`` so the tensors can still be shown.
    """
    if source.size < 8:
        raise _truncated(
            source, f"{source.size} bytes: too short for a safetensors file (empty or truncated)"
        )
    head = source.head(PROBE_BYTES)
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES:
        raise _bad(
            source, f"header length {length} is over the {MAX_HEADER_BYTES}-byte limit: not safetensors"
        )
    if 8 + length > source.size:
        raise _truncated(
            source,
            f"header length {length} runs past the end of the {source.size}-byte file "
            "(truncated inside the header, or not a safetensors file)",
        )
    raw = head[8 : 8 + length] if len(head) >= 8 + length else source.read(8, 8 + length)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise _bad(source, f"header is not valid JSON ({exc}): not a safetensors file") from None
    except RecursionError:
        raise _bad(source, "header JSON is nested too deeply: not a safetensors file") from None
    if not isinstance(header, dict):
        raise _bad(source, "header is not a JSON object: not a safetensors file")
    return _validate(source, length, header)


def _validate(source: FileSource, length: int, header: dict[str, Any]) -> SafetensorsHeader:
    defects: list[Defect] = []
    file = source.rel or source.location.url

    def defect(message: str, truncated: bool = False) -> None:
        defects.append(Defect(file, message, truncated))

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        defect("__metadata__ is not an object")
        metadata = {}
    spans: list[tuple[int, int, str]] = []
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _bad(source, f"tensor {name[:200]!r}: entry is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        dtype = SAFETENSORS_DTYPE.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise _bad(source, f"tensor {name[:200]!r}: unknown dtype {plain_value(code)!s:.40}")
        try:
            dims = checked_shape(shape, f"tensor {name[:200]!r}")
        except IntegrityError as exc:
            raise _bad(source, exc.message) from None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and 0 <= o < MAX_DIMENSION for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise _bad(source, f"tensor {name[:200]!r}: invalid data_offsets {plain_value(offsets)!s:.80}")
        expected = nbytes_of(dtype, dims)
        if offsets[1] - offsets[0] != expected:
            defect(
                f"tensor {name!r}: {dtype} {list(dims)} needs {expected} bytes, span is {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
        tensors.append(TensorInfo(name, dtype, dims, expected))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "a hole" if begin > position else "an overlap"
            defect(f"tensor {name!r} starts at {begin}, previous data ends at {position} ({what})")
        position = max(position, end)
    expected_size = 8 + length + position
    if expected_size > source.size:
        defect(
            f"data cut short: header needs {expected_size} bytes, file has {source.size} (truncated)",
            truncated=True,
        )
    elif expected_size < source.size:
        defect(f"{source.size - expected_size} bytes after the last tensor (header needs {expected_size})")
    base = 8 + length
    return SafetensorsHeader(
        length,
        {str(k): str(v) for k, v in metadata.items()},
        tuple(tensors),
        tuple(defects),
        {name: (base + begin, base + end) for begin, end, name in spans},
    )
