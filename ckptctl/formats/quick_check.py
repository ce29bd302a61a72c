"""Cheap "is this file whole?" checks for single-file checkpoints, with one or two small ranged reads.

Single files (``step_100.pt``, Lightning ``.ckpt``, ``*.safetensors``) carry no completion marker, so the
catalog asks the file itself: a torch zip archive ends with its end-of-central-directory record, a legacy torch
file's pickles say how long its data section is, and a safetensors file's header says exactly how long the file
must be. A truncated upload or an interrupted ``torch.save`` fails all three. The checks are the format
readers' own validation (one piece of code per check).

The verdict is ``False`` (incomplete) only when a cut is proven — the trailer is missing, a declared size runs
past the end — never because the file is damaged in another way, of an unknown kind, or unreadable: those are
``None`` (unknown), so that ``prune --incomplete`` can never delete a file that ckptctl merely could not check.

Cost: a safetensors header is one read (two beyond 64 KiB); a zip archive one read of its tail; a legacy file
that read plus one of its start (formats/torch_legacy.py: more only for a pickle over 64 KiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptctl.errors import IntegrityError, TruncatedError
from ckptctl.formats.model import Defect
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import PROBE_BYTES, FileSource
from ckptctl.formats.torch_legacy import is_cut_magic, is_legacy_head, read_legacy_torch
from ckptctl.formats.torch_zip import ZIP_MAGIC, read_zip_directory

if TYPE_CHECKING:
    from ckptctl.storage.location import Location


@dataclass(frozen=True)
class QuickCheck:
    ok: bool | None
    """True: whole; False: proven cut short (truncated); None: cannot tell (damaged otherwise, unknown kind)."""
    reason: str


def _reason(error: IntegrityError, source: FileSource) -> str:
    prefix = f"{source.name}: "
    return error.message[len(prefix) :] if error.message.startswith(prefix) else error.message


def verdict_of(defects: list[Defect] | tuple[Defect, ...], whole: str) -> QuickCheck:
    """A reader's defects as a verdict: incomplete only when every defect is a proven truncation."""
    if not defects:
        return QuickCheck(True, whole)
    if all(d.truncated for d in defects):
        return QuickCheck(False, defects[0].message)
    damage = next(d for d in defects if not d.truncated)
    return QuickCheck(None, f"damaged, not proven truncated: {damage.message}")


def _failure(error: IntegrityError, source: FileSource) -> QuickCheck:
    if isinstance(error, TruncatedError):
        return QuickCheck(False, _reason(error, source))
    return QuickCheck(None, f"could not be checked: {_reason(error, source)}")


def quick_check_file(
    location: Location, rel: str, size: int, *, source: FileSource | None = None
) -> QuickCheck:
    """Tell whether a single-file checkpoint is whole, from a read or two (module docstring). Pass ``source``
    to keep what was read for a later reader of the same file (its cache serves the directory again)."""
    if size == 0:
        return QuickCheck(False, "empty file")
    source = source or FileSource(location, rel, size)
    if rel.endswith(".safetensors"):
        try:
            header = read_safetensors_header(source)
        except IntegrityError as exc:
            return _failure(exc, source)
        return verdict_of(header.defects, "safetensors header matches the file size")
    return check_torch_file(source)


def check_torch_file(source: FileSource) -> QuickCheck:
    """A torch zip archive or legacy file: whole, cut (False), or not checkable (None)."""
    try:
        read_zip_directory(source)
        return QuickCheck(True, "zip end-of-central-directory record present")
    except IntegrityError as exc:
        zip_error = exc
    head = source.head(PROBE_BYTES)
    if is_legacy_head(head):
        return check_legacy_file(source)
    if head.startswith(ZIP_MAGIC):
        return _failure(zip_error, source)
    if is_cut_magic(head) or (len(head) < len(ZIP_MAGIC) and ZIP_MAGIC.startswith(head)):
        return QuickCheck(False, f"{source.size} bytes: the start of a torch file, cut short (truncated)")
    return QuickCheck(None, "not a torch zip or legacy file")


def check_legacy_file(source: FileSource) -> QuickCheck:
    """Walk the pickles (inert records for foreign classes: nothing is shown) and compare the storages' sizes
    with the file's."""
    try:
        legacy = read_legacy_torch(source, foreign="inert")
        defects = legacy.check("cached")
    except IntegrityError as exc:
        return _failure(exc, source)
    if legacy.unknown is not None and not defects:
        return QuickCheck(None, f"legacy torch file whose size cannot be checked: {legacy.unknown}")
    if legacy.trailing_bytes and not defects:
        return QuickCheck(
            None, f"legacy torch file with {legacy.trailing_bytes} bytes after its last storage"
        )
    return verdict_of(defects, "legacy torch file: its storages end exactly at the end of the file")
