"""The run's pointer files (DeepSpeed ``latest``, Megatron's ``latest_checkpointed_iteration.txt``) on both sides.

A run restored without its ``latest`` does not resume: ``engine.load_checkpoint(dir)`` finds no tag. So push
copies each pointer file once the checkpoint it names is tiered, and after that checkpoint's manifest (the
remote never names a checkpoint it does not hold whole); pull writes one back only where the checkpoint it
names is present locally and no local pointer is there (the trainer's own pointer is never overwritten).
Links and pointers inside checkpoints (``best`` in trainer_state.json) stay where they are: they travel with
their checkpoint or mean nothing elsewhere.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Collection
from dataclasses import dataclass

from ckptctl.catalog.layouts import POINTER_FILE_NAMES
from ckptctl.catalog.model import Pointer, RunScan
from ckptctl.catalog.scan import scan_run, sibling_named
from ckptctl.errors import NotFoundError
from ckptctl.storage.location import Location
from ckptctl.tiering.manifest import RemoteView

MAX_POINTER_BYTES = 4096
"""Pointer files hold a tag or an iteration number; anything larger is not one of them."""


@dataclass(frozen=True)
class PointerCopy:
    source: str
    """The pointer file, relative to the run."""
    target: str
    """The checkpoint it names, relative to the run."""


def _is_pointer_file(pointer: Pointer) -> bool:
    parts = pointer.source.split("/")
    return posixpath.basename(pointer.source) in POINTER_FILE_NAMES and ".." not in parts and "" not in parts


def _still_names(pointer: Pointer, data: bytes, step: int | None) -> bool:
    """Whether the pointer file's bytes, read now, name what the scan said: the trainer may have moved ``latest``
    to a newer (untiered) checkpoint while the push ran."""
    text = data.decode("utf-8", "replace").strip()
    if pointer.name == "tracker":
        return text == "release" == posixpath.basename(pointer.target) or (
            text.isdigit() and int(text) == step
        )
    return sibling_named(pointer.source, text) == pointer.target


def push_pointers(
    local: Location, remote: Location, scan: RunScan, tiered: Collection[str], *, dry_run: bool
) -> list[PointerCopy]:
    """Copy the local pointer files whose checkpoint is in ``tiered`` (units with a verified manifest) to the
    remote run, where the remote's copy differs. Returns what was (or, in a dry run, would be) written."""
    written = []
    for pointer in scan.pointers:
        path = local.full_path(pointer.source)
        if not _is_pointer_file(pointer) or pointer.target not in tiered or os.path.islink(path):
            continue
        try:
            if os.path.getsize(path) > MAX_POINTER_BYTES:
                continue
            data = local.read_bytes(pointer.source)
        except (OSError, NotFoundError):
            continue  # removed since the scan: nothing to send
        target = scan.unit(pointer.target)
        if not _still_names(pointer, data, target.step if target else None):
            continue  # moved on since the scan; the next push sends it once what it names is tiered
        try:
            if remote.read_bytes(pointer.source) == data:
                continue
        except NotFoundError:
            pass
        if not dry_run:
            remote.write_bytes(pointer.source, data)
        written.append(PointerCopy(pointer.source, pointer.target))
    return written


def pull_pointers(view: RemoteView, dest_root: str, tiered: Collection[str]) -> list[PointerCopy]:
    """Write the remote run's pointer files under ``dest_root`` where the checkpoint they name (one of ``tiered``)
    is there and no local pointer is. The remote is cataloged from the listing ``view`` already holds."""
    remote = view.location
    local = Location.from_url(dest_root)
    written = []
    for pointer in scan_run(remote, require_units=False, entries=view.entries.values()).pointers:
        if not _is_pointer_file(pointer) or pointer.target not in tiered:
            continue
        if not os.path.lexists(local.full_path(pointer.target)) or os.path.lexists(
            local.full_path(pointer.source)
        ):
            continue
        data = remote.read_bytes(pointer.source)
        if len(data) > MAX_POINTER_BYTES:
            continue
        local.write_bytes(pointer.source, data)
        written.append(PointerCopy(pointer.source, pointer.target))
    return written
