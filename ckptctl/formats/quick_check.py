"""Cheap "is this file whole?" checks for single-file checkpoints, with one small ranged read.

Single files (``step_100.pt``, Lightning ``.ckpt``, ``*.safetensors``) carry no completion marker, so the
catalog asks the file itself: a torch zip archive ends with its end-of-central-directory record, and a
safetensors file's header says exactly how long the file must be. A truncated upload or an interrupted
``torch.save`` fails both. These checks read at most 64 KiB (two reads for a safetensors header beyond that).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptctl.storage.location import Location

PROBE_BYTES = 64 * 1024
_EOCD = b"PK\x05\x06"
_EOCD_MIN = 22
_SAFETENSORS_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class QuickCheck:
    ok: bool | None
    """True: whole; False: defective; None: cannot tell cheaply."""
    reason: str


def check_safetensors_head(head: bytes, size: int) -> QuickCheck | int:
    """Judge a safetensors file from its first bytes; returns the header length when more bytes are needed."""
    if size < 8 or len(head) < 8:
        return QuickCheck(False, f"{size} bytes: too short for a safetensors header")
    (length,) = struct.unpack("<Q", head[:8])
    if length > _SAFETENSORS_MAX_HEADER or 8 + length > size:
        return QuickCheck(
            False, f"header length {length} runs past the end of the {size}-byte file (truncated?)"
        )
    if len(head) < 8 + length:
        return length
    try:
        header = json.loads(head[8 : 8 + length])
    except ValueError:
        return QuickCheck(False, "header is not valid JSON")
    if not isinstance(header, dict):
        return QuickCheck(False, "header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return QuickCheck(False, f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    expected = 8 + length + end
    if expected != size:
        return QuickCheck(False, f"header says {expected} bytes, file has {size} (truncated?)")
    return QuickCheck(True, "safetensors header matches the file size")


def check_zip_tail(tail: bytes, size: int) -> QuickCheck:
    """Judge a torch zip archive by its end-of-central-directory record (found in the last bytes)."""
    pos = tail.rfind(_EOCD)
    if pos < 0 or len(tail) - pos < _EOCD_MIN:
        return QuickCheck(False, "no zip end-of-central-directory record (truncated, or legacy torch format)")
    cd_size, cd_offset = struct.unpack("<II", tail[pos + 12 : pos + 20])
    eocd_offset = size - len(tail) + pos
    if cd_offset != 0xFFFFFFFF and cd_offset + cd_size > eocd_offset:
        return QuickCheck(False, "zip central directory lies past its end record (corrupt)")
    return QuickCheck(True, "zip end-of-central-directory record present")


def quick_check_file(location: Location, rel: str, size: int) -> QuickCheck:
    """One ranged read (two for a large safetensors header) to tell whether a single-file checkpoint is whole."""
    if size == 0:
        return QuickCheck(False, "empty file")
    if rel.endswith(".safetensors"):
        head = location.read_range(rel, 0, min(size, PROBE_BYTES))
        verdict = check_safetensors_head(head, size)
        if isinstance(verdict, int):
            head = location.read_range(rel, 0, 8 + verdict)
            verdict = check_safetensors_head(head, size)
        assert isinstance(verdict, QuickCheck)
        return verdict
    tail = location.read_range(rel, max(0, size - PROBE_BYTES), size)
    return check_zip_tail(tail, size)
