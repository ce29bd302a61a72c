"""Real trainers' checkpoint runs (tests/fixtures/trainers, made by gen.py there) and a way to lay one out with
believable file times.

Git keeps no file times, so ``manifest.json`` records each file's mtime relative to the run's earliest file;
:func:`materialise` copies a run and restores that order and spacing, shifted so the newest file is
``newest_age_seconds`` old (old enough that no "still being written" settle window applies). Every file is
checked against the manifest's sha256 first; any mismatch, missing or unlisted file raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from functools import cache
from pathlib import Path
from typing import Any

TRAINER_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "trainers"
MANIFEST = TRAINER_FIXTURES / "manifest.json"


class FixtureMismatch(AssertionError):
    """A committed fixture file does not match manifest.json (regenerate with gen.py, or restore the file)."""


@cache
def _manifest_cached() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(MANIFEST.read_text())
    return data


def manifest() -> dict[str, Any]:
    """The parsed manifest.json (a fresh copy each call; callers may mutate it)."""
    copied: dict[str, Any] = json.loads(json.dumps(_manifest_cached()))
    return copied


def runs() -> list[str]:
    """Names of the recorded runs (``lightning``, ``hf-trainer``, …)."""
    return sorted(_manifest_cached()["runs"])


def run_entry(run: str) -> dict[str, Any]:
    """The manifest entry of one run: ``files``, ``dirs``, ``trainer`` (what the trainer kept / considers best)."""
    entries: dict[str, Any] = manifest()["runs"]
    if run not in entries:
        raise KeyError(f"no trainer fixture run {run!r}; known: {sorted(entries)}")
    entry: dict[str, Any] = entries[run]
    return entry


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_run(run: str) -> list[str]:
    """Every way the committed files of ``run`` differ from the manifest (empty when they match)."""
    entry = run_entry(run)
    src = TRAINER_FIXTURES / run
    problems: list[str] = []
    listed = {f["path"] for f in entry["files"]}
    on_disk = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() or p.is_symlink()}
    problems += [f"{run}/{p}: missing" for p in sorted(listed - on_disk)]
    problems += [f"{run}/{p}: not in manifest.json" for p in sorted(on_disk - listed)]
    for f in entry["files"]:
        path = src / f["path"]
        if f["path"] not in on_disk:
            continue
        if path.is_symlink():
            problems.append(f"{run}/{f['path']}: a symlink, expected a regular file")
            continue
        data = path.read_bytes()
        if len(data) != f["size"]:
            problems.append(f"{run}/{f['path']}: {len(data)} bytes, manifest says {f['size']}")
        elif _sha256(data) != f["sha256"]:
            problems.append(f"{run}/{f['path']}: sha256 differs from manifest")
    return problems


def materialise(run: str, dest: Path, *, newest_age_seconds: float = 3600.0) -> Path:
    """Copy the trainer run ``run`` to ``dest/run`` and return that folder.

    Every file's mtime (and atime) is set so that the order and spacing recorded in the manifest are kept and the
    newest file is ``newest_age_seconds`` old; folders get their recorded times on the same clock (a folder may
    be a few milliseconds newer than the newest file, as when a trainer deleted an old checkpoint last). Raises
    :class:`FixtureMismatch` before writing anything if any committed file is missing, unlisted, or differs
    from the manifest, and ``FileExistsError`` if ``dest/run`` exists.
    """
    problems = check_run(run)
    if problems:
        raise FixtureMismatch("; ".join(problems))
    entry = run_entry(run)
    src = TRAINER_FIXTURES / run
    root = Path(dest) / run
    root.mkdir(parents=True, exist_ok=False)
    for d in entry["dirs"]:
        (root / d["path"]).mkdir(parents=True, exist_ok=True)
    for f in entry["files"]:
        data = (src / f["path"]).read_bytes()
        if _sha256(data) != f["sha256"]:  # re-check what is actually copied
            raise FixtureMismatch(f"{run}/{f['path']}: sha256 changed while copying")
        target = root / f["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def offset_ns(seconds: float) -> int:
        return round(seconds * 1_000_000_000)

    newest = max(offset_ns(f["mtime"]) for f in entry["files"])
    base = time.time_ns() - offset_ns(newest_age_seconds) - newest
    for f in entry["files"]:
        t = base + offset_ns(f["mtime"])
        os.utime(root / f["path"], ns=(t, t))
    # Folders last (writing files into them moved their times), deepest first.
    for d in sorted(entry["dirs"], key=lambda d: d["path"].count("/") + (d["path"] != "."), reverse=True):
        t = base + offset_ns(d["mtime"])
        os.utime(root / d["path"], ns=(t, t))
    return root
