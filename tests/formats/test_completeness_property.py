"""No structurally whole file is ever called incomplete, and every truncation of one is (issue 14 "Done when").

For real files of every single-file format — torch zip (a shared fixture and torch-made training states), torch
legacy (torch-made), safetensors (shared fixtures) — the catalog's check (``quick_check_file``, what ``list``
and ``prune --incomplete`` use) says whole on the file and cut on every prefix of it, and ``inspect`` agrees.
The cut points: every one in the first and last 64 bytes, both sides of every structural boundary (pickle ends,
storage counts, zip members and directory, the safetensors header), and a seeded sample of the rest.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from ckptctl.errors import IntegrityError
from ckptctl.formats.quick_check import quick_check_file
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_legacy import read_legacy_torch
from ckptctl.formats.torch_zip import read_zip_directory
from ckptctl.inspect import inspect_checkpoint
from ckptctl.storage.location import Location
from tests.conftest import SHARED_FIXTURES
from tests.formats.torch_files import torch_files

__all__ = ["torch_files"]

SAMPLED = 40

FIXTURE_FILES = [
    SHARED_FIXTURES / "lora" / "lora_basic" / "full_state_dict.pt",
    SHARED_FIXTURES
    / "zero"
    / "z2-bf16-untied"
    / "checkpoint"
    / "global_step3"
    / "mp_rank_00_model_states.pt",
    SHARED_FIXTURES / "lora" / "bases" / "llama" / "model.safetensors",
    SHARED_FIXTURES / "lora" / "lora_basic" / "adapter" / "adapter_model.safetensors",
]
MADE_FILES = [
    "weights.pt",
    "optimizer.pt",
    "rng_state.pth",
    "weights-legacy.pt",
    "tutorial-legacy.pt",
    "rng_state-legacy.pth",
    "large-legacy.pt",
    "epoch=2-step=30-legacy.ckpt",
]


def _boundaries(path: Path) -> set[int]:
    source = FileSource(Location.from_url(str(path.parent)), path.name, path.stat().st_size)
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        (length,) = struct.unpack("<Q", raw[:8])
        return {8, 8 + length}
    if raw.startswith(b"PK"):
        directory = read_zip_directory(source)
        return {m.header_offset for m in directory.members} | {directory.cd_offset, directory.eocd_offset}
    legacy = read_legacy_torch(source)
    return (
        {legacy.data_start}
        | {s.count_offset for s in legacy.storages}
        | {s.data_offset for s in legacy.storages}
    )


def cut_points(path: Path) -> list[int]:
    size = path.stat().st_size
    points = set(range(64)) | set(range(size - 64, size))
    points |= {b + d for b in _boundaries(path) for d in (-1, 0, 1)}
    points |= set(random.Random(path.name).sample(range(size), SAMPLED))
    return sorted(p for p in points if 0 <= p < size)


def _verdicts(path: Path) -> tuple[bool | None, bool]:
    """(the catalog's verdict, inspect's: complete or not)."""
    check = quick_check_file(Location.from_url(str(path.parent)), path.name, path.stat().st_size)
    try:
        complete = inspect_checkpoint(str(path)).complete
    except IntegrityError:
        complete = False
    return check.ok, complete


@pytest.mark.parametrize("name", [p.name for p in FIXTURE_FILES] + MADE_FILES)
def test_whole_is_complete_and_every_cut_is_incomplete(torch_files: Path, tmp_path: Path, name: str) -> None:
    original = next((p for p in FIXTURE_FILES if p.name == name), torch_files / name)
    raw = original.read_bytes()
    path = tmp_path / name
    path.write_bytes(raw)
    assert _verdicts(path) == (True, True)
    assert inspect_checkpoint(str(path), verify=True).complete
    wrong = []
    for cut in cut_points(original):
        path.write_bytes(raw[:cut])
        verdict = _verdicts(path)
        if verdict != (False, False):
            wrong.append((cut, verdict))
    assert wrong == [], f"{name}: cuts not called incomplete: {wrong[:10]}"
