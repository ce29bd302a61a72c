"""Cheap "is this file whole?" checks for single-file checkpoints, with one small ranged read.

Single files (``step_100.pt``, Lightning ``.ckpt``, ``*.safetensors``) carry no completion marker, so the
catalog asks the file itself: a torch zip archive ends with its end-of-central-directory record, and a
safetensors file's header says exactly how long the file must be. A truncated upload or an interrupted
``torch.save`` fails both. The checks are the format readers' own validation (one piece of code per check):
a safetensors header costs one read (two beyond 64 KiB), a zip directory one read of the tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptctl.errors import IntegrityError
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_zip import read_zip_directory

if TYPE_CHECKING:
    from ckptctl.storage.location import Location


@dataclass(frozen=True)
class QuickCheck:
    ok: bool | None
    """True: whole; False: defective; None: cannot tell cheaply."""
    reason: str


def _reason(error: IntegrityError, source: FileSource) -> str:
    prefix = f"{source.name}: "
    return error.message[len(prefix) :] if error.message.startswith(prefix) else error.message


def quick_check_file(location: Location, rel: str, size: int) -> QuickCheck:
    """One ranged read (two for a large safetensors header) to tell whether a single-file checkpoint is whole."""
    if size == 0:
        return QuickCheck(False, "empty file")
    source = FileSource(location, rel, size)
    try:
        if rel.endswith(".safetensors"):
            header = read_safetensors_header(source)
            if header.defects:
                return QuickCheck(False, header.defects[0].message)
            return QuickCheck(True, "safetensors header matches the file size")
        read_zip_directory(source)
    except IntegrityError as exc:
        return QuickCheck(False, _reason(exc, source))
    return QuickCheck(True, "zip end-of-central-directory record present")
