"""The structural check of any one file of a checkpoint, by its format: what ``inspect --verify`` runs on every
file of a unit folder (issue 14 item 5), besides the files its main reader already checked.

A checkpoint folder holds more than its weights (HF Trainer: ``optimizer.pt``, ``scheduler.pt``,
``rng_state*.pth``, ``training_args.bin``, ``trainer_state.json``; Accelerate: ``optimizer.bin``,
``random_states_0.pkl``), and a resume needs every one of them whole. Each is checked as what its bytes are,
whatever its name says: safetensors (header and sizes), torch zip (directory, member sizes, ``data.pkl`` parses,
every tensor inside its storage), torch legacy (pickles, storage sizes and counts), plain pickle (ends at its
STOP), JSON (parses). Pickles are parsed with ``foreign="inert"``: the content is not shown, only whether the
file is whole, so a ``TrainingArguments`` object is no defect (and never runs). Files of other kinds are not
checked, and said so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ckptctl.errors import IntegrityError, TruncatedError
from ckptctl.formats.model import Defect
from ckptctl.formats.plain_pickle import is_pickle_head, read_pickle_file
from ckptctl.formats.safetensors_header import read_safetensors_header
from ckptctl.formats.source import PROBE_BYTES, FileSource
from ckptctl.formats.torch_legacy import is_cut_magic, is_legacy_head, read_legacy_torch
from ckptctl.formats.torch_zip import ZIP_MAGIC, read_torch_archive
from ckptctl.storage.location import FileEntry, Location

TORCH_NAMES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
# JSON files of checkpoints are markers and configs: kilobytes (a long run's trainer_state.json a few MB).
MAX_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileCheck:
    path: str
    kind: str | None
    """What the file was checked as (``safetensors``, ``torch zip``, ``torch legacy``, ``pickle``, ``json``),
    or None when it has no format ckptctl can check."""
    defects: tuple[Defect, ...] = ()


def _defect(path: str, error: IntegrityError) -> Defect:
    message = error.message
    for prefix in (f"{path}: ", f"{path.rsplit('/', 1)[-1]}: "):
        message = message.removeprefix(prefix)
    return Defect(path, message, truncated=isinstance(error, TruncatedError))


def is_checkable_name(name: str) -> bool:
    return name.endswith((".safetensors", ".json", *TORCH_NAMES))


def check_file(location: Location, entry: FileEntry) -> FileCheck:
    """Check one listed file (module docstring): a small read or two, the whole file for JSON and plain
    pickles, every storage count of a legacy file."""
    path, name = entry.path, entry.name
    if not is_checkable_name(name):
        return FileCheck(path, None)
    if entry.size == 0:
        return FileCheck(path, "empty", (Defect(path, "empty file", truncated=True),))
    source = FileSource(location, path, entry.size)
    kind = "safetensors" if name.endswith(".safetensors") else "json" if name.endswith(".json") else None
    try:
        if kind == "safetensors":
            return FileCheck(path, kind, read_safetensors_header(source).defects)
        if kind == "json":
            return _check_json(source)
        head = source.head(PROBE_BYTES)
        kind = _pickled_kind(head)
        if kind is None and (is_cut_magic(head) or (len(head) < 4 and ZIP_MAGIC.startswith(head))):
            return FileCheck(
                path, "torch", (Defect(path, f"{entry.size} bytes: a torch file cut short", True),)
            )
        if kind == "torch zip":
            archive = read_torch_archive(source, foreign="inert")
            return FileCheck(path, kind, tuple(archive.check_members()))
        if kind == "torch legacy":
            legacy = read_legacy_torch(source, foreign="inert")
            return FileCheck(path, kind, tuple(legacy.check("all")))
        if kind == "pickle":
            read_pickle_file(source, foreign="inert")
            return FileCheck(path, kind)
        return FileCheck(path, None)
    except IntegrityError as exc:
        return FileCheck(path, kind, (_defect(path, exc),))


def _pickled_kind(head: bytes) -> str | None:
    if head.startswith(ZIP_MAGIC):
        return "torch zip"
    if is_legacy_head(head):
        return "torch legacy"
    if is_pickle_head(head):
        return "pickle"
    return None


def _check_json(source: FileSource) -> FileCheck:
    if source.size > MAX_JSON_BYTES:
        return FileCheck(source.rel, None)
    try:
        json.loads(source.read(0, source.size))
    except RecursionError:
        return FileCheck(source.rel, "json", (Defect(source.rel, "JSON nested too deeply"),))
    except ValueError as exc:
        cut = "Expecting" in str(exc) and str(exc).endswith(f"(char {source.size})")
        message = f"not valid JSON ({str(exc)[:120]})" + (" (truncated)" if cut else "")
        return FileCheck(source.rel, "json", (Defect(source.rel, message, truncated=cut),))
    return FileCheck(source.rel, "json")
