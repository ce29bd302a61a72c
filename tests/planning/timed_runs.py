"""HF Trainer runs whose file times the test sets: each save's weights, then its optimizer state, then
``trainer_state.json`` (the marker) ``write_seconds`` after the weights, as the Trainer writes them."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tests.conftest import Backend

MARKER = "trainer_state.json"


@dataclass(frozen=True)
class SaveSpec:
    step: int
    marker_at: float
    """Seconds after the run's start; for an incomplete save, when its last file was written."""
    write_seconds: float
    complete: bool = True
    weights: int = 4096


def unit_files(save: SaveSpec) -> dict[str, bytes]:
    """The files of one save, in the order the Trainer writes them."""
    files = {"model.safetensors": b"w" * save.weights, "optimizer.pt": b"o" * (2 * save.weights)}
    if save.complete:
        files[MARKER] = json.dumps({"global_step": save.step, "log_history": []}).encode()
    return files


def unit_bytes(save: SaveSpec) -> int:
    return sum(len(data) for data in unit_files(save).values())


def file_times(save: SaveSpec, start: float) -> dict[str, float]:
    """Each file's time: the first at the save's start, the last (the marker) ``write_seconds`` later."""
    names = list(unit_files(save))
    begin = start + save.marker_at - save.write_seconds
    spacing = save.write_seconds / (len(names) - 1)
    return {f"checkpoint-{save.step}/{name}": begin + i * spacing for i, name in enumerate(names)}


def write_timed_run(root: Path, saves: list[SaveSpec], *, start: float | None = None) -> dict[str, float]:
    """Lay the run out locally with its file times; returns {path in the run: mtime}. By default the run
    ends a day ago, so no save is still settling."""
    start = time.time() - 86_400 - max(s.marker_at for s in saves) if start is None else start
    times: dict[str, float] = {}
    for save in saves:
        for name, data in unit_files(save).items():
            path = root / f"checkpoint-{save.step}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        times.update(file_times(save, start))
    for rel, stamp in times.items():
        os.utime(root / rel, (stamp, stamp))
    return times


def put_timed_run(backend: Backend, tmp_path: Path, saves: list[SaveSpec], rel: str = "run") -> str:
    """The run on ``backend`` (local or memory://, whose file times can be set) with the times of ``saves``."""
    local = tmp_path / "timed-run"
    times = write_timed_run(local, saves)
    url = backend.put_tree(local, rel)
    if backend.name == "memory":
        location = backend.location(rel)
        for path, stamp in times.items():
            key = location.fs._strip_protocol(location.full_path(path))
            location.fs.store[key].created = datetime.fromtimestamp(stamp, tz=timezone.utc)
    elif backend.name != "local":
        raise ValueError(f"file times cannot be set on {backend.name}")
    return url


def steady_run(
    count: int = 5,
    *,
    every: int = 100,
    interval: float = 600.0,
    write: float = 30.0,
    incomplete: int | None = None,
) -> list[SaveSpec]:
    """``count`` saves every ``every`` steps, markers ``interval`` apart, each written in ``write`` seconds;
    the ``incomplete``-th (1-based) crashed before its marker."""
    return [
        SaveSpec(every * (i + 1), interval * (i + 1), write, complete=(i + 1) != incomplete)
        for i in range(count)
    ]
