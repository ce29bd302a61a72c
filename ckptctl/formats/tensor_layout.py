"""Where a tensor's bytes lie (ranges of files, chunks of a global tensor) and in what order: the records every
format reader hands to ``convert/`` so that it can stream tensors without knowing the format."""

from __future__ import annotations

import math
from dataclasses import dataclass


def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """C order, as torch's ``is_contiguous``: the strides of size-1 dimensions, and of empty tensors, do not
    matter. Only such tensors can be streamed as one byte range."""
    if len(shape) != len(stride):
        return False
    if math.prod(shape) <= 1:
        return True
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride), strict=True):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


@dataclass(frozen=True)
class Range:
    """Bytes [start, end) of one file, relative to the tensor's location."""

    rel: str
    start: int
    end: int


@dataclass(frozen=True)
class Chunk:
    """A block of a tensor stored on its own (a DCP chunk, a DTensor shard): where it lies in the global tensor
    (``offsets``, ``sizes``, C order) and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    range: Range
