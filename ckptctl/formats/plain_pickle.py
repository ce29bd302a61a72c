"""Plain pickle files (``pickle.dump``: some trainers' RNG or data-loader state, ``*.pkl``), read through the
restricted unpickler.

``pickle.dump`` writes one pickle and nothing after it, so a whole file ends exactly at its STOP opcode; one
that ends before it was cut. Such files are small (kilobytes): one read of the whole file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from ckptctl.errors import IntegrityError
from ckptctl.formats.restricted_pickle import MAX_PICKLE_BYTES, Foreign, restricted_load
from ckptctl.formats.source import FileSource

_PROTO = 0x80


def is_pickle_head(head: bytes) -> bool:
    """A pickle of protocol 2 or later starts with the PROTO opcode and its version."""
    return len(head) >= 2 and head[0] == _PROTO and 2 <= head[1] <= 5


@dataclass(frozen=True)
class PlainPickle:
    obj: Any
    end: int
    """Where the pickle's STOP opcode ends; bytes after it are not part of it."""


def read_pickle_file(source: FileSource, *, foreign: Foreign = "refuse") -> PlainPickle:
    """Unpickle a whole file with the allow-list; TruncatedError when it ends before its pickle does."""
    if source.size > MAX_PICKLE_BYTES:
        raise IntegrityError(
            f"{source.name}: a {source.size}-byte pickle, over the {MAX_PICKLE_BYTES}-byte limit",
            url=source.location.url_of(source.rel),
        )
    stream = io.BytesIO(source.read(0, source.size))
    try:
        obj = restricted_load(stream, foreign=foreign)
    except IntegrityError as exc:
        raise type(exc)(f"{source.name}: {exc.message}", url=source.location.url_of(source.rel)) from None
    return PlainPickle(obj, stream.tell())
