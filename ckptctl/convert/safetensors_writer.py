"""A streaming safetensors writer: the header is computed before any tensor data is read, then each tensor is
written as it is assembled, so memory is bounded by the largest tensor, not the model. Tensors keep the order
they are given in (the state dict's order), which the format allows."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

from ckptctl.errors import UsageError
from ckptctl.formats.model import SAFETENSORS_CODE, nbytes_of


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    """torch-style dtype name (float32, bfloat16, ...)."""
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def encode_header(tensors: Iterable[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces to a multiple of 8 as safetensors does."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in SAFETENSORS_CODE:
            raise UsageError(f"tensor {tensor.name}: safetensors has no {tensor.dtype} dtype")
        header[tensor.name] = {
            "dtype": SAFETENSORS_CODE[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


class SafetensorsStream:
    """Write the header, then feed tensors' bytes in header order; ``close`` checks every byte was written."""

    def __init__(self, handle: IO[bytes], tensors: list[PlannedTensor], metadata: dict[str, str]) -> None:
        self._handle = handle
        self._expected = [t.nbytes for t in tensors]
        self._names = [t.name for t in tensors]
        self._index = 0
        handle.write(encode_header(tensors, metadata))

    def write(self, name: str, chunks: Iterable[bytes]) -> int:
        """Write one tensor's bytes, given in pieces (so no tensor needs to be whole in memory)."""
        if self._index >= len(self._names) or self._names[self._index] != name:
            raise ValueError(f"writer out of step at {name!r}")
        written = 0
        for chunk in chunks:
            self._handle.write(chunk)
            written += len(chunk)
        if written != self._expected[self._index]:
            raise ValueError(f"{name}: wrote {written} bytes, the header says {self._expected[self._index]}")
        self._index += 1
        return written

    def close(self) -> None:
        if self._index != len(self._names):
            raise ValueError(f"only {self._index} of {len(self._names)} tensors written")
