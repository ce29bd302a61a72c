"""What a run and its checkpoints are: plain frozen records, shared by every command."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ckptctl.storage.location import FileEntry

Ordinal = Literal["step", "save"]
"""What a unit's number counts: training steps, or saves (Accelerate's ``checkpoint_N`` counts saves)."""


class Status(str, Enum):
    """How sure we are that a checkpoint is whole.

    Only ``COMPLETE`` units are ever counted or deleted by retention; everything else is kept.
    """

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    IN_PROGRESS = "in-progress"
    UNKNOWN = "unknown"


class Layout(str, Enum):
    """The trainer family whose naming and completeness rules a unit follows."""

    HF_TRAINER = "hf-trainer"
    DEEPSPEED = "deepspeed"
    DCP = "dcp"
    LIGHTNING = "lightning"
    MEGATRON = "megatron"
    ORBAX = "orbax"
    OPEN_INSTRUCT = "open-instruct"
    OLMO_CORE = "olmo-core"
    ACCELERATE = "accelerate"
    NEMO = "nemo"
    COMPOSER = "composer"
    PLAIN_FILE = "file"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class UnitFile:
    """One file of a unit; ``path`` is relative to the run."""

    path: str
    size: int
    mtime: float | None
    etag: str | None = None


POLICY_FILE = ".ckptctl.toml"
"""Keep rules written beside the runs (``retention/policy_files.py``); the catalog only finds them in listings."""


def policy_files_in(entries: Iterable[FileEntry]) -> frozenset[str]:
    """The paths of every policy file a listing holds, whatever their type (a link or FIFO in that place is
    found here and refused when read)."""
    return frozenset(e.path for e in entries if e.path.rsplit("/", 1)[-1] == POLICY_FILE)


@dataclass(frozen=True)
class Pointer:
    """A pointer file or link that names a unit (``latest``, a Megatron tracker, ``last.ckpt``...)."""

    name: str
    """How it shows in ``list``: ``latest``, ``tracker``, ``last.ckpt``, ``best``..."""
    source: str
    """The file (relative to the run) that holds the pointer."""
    target: str
    """The unit path (relative to the run) it names."""


@dataclass(frozen=True)
class Unit:
    """One checkpoint of a run: a folder or a single file."""

    path: str
    """Relative to the run, '/'-separated."""
    kind: str
    """``dir`` or ``file``."""
    layout: Layout
    step: int | None
    epoch: int | None
    status: Status
    reason: str
    files: tuple[UnitFile, ...]
    total_bytes: int
    newest_mtime: float | None
    pointers: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    metric_source: str | None = None
    ordinal: Ordinal = "step"
    """``save`` when ``step`` is a save counter rather than a training step (Accelerate)."""
    counted: bool = True
    """False for a copy a trainer keeps under a fixed name (Lightning's regular-file ``last.ckpt``): shown,
    never counted by retention and never deleted."""
    marker_checked: bool = False
    """Whether the completion marker's contents were read and found whole (not only its presence)."""
    journaled: bool = False
    """Named by an interrupted prune's journal: half-deleted, never complete; the next prune finishes it."""

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def run(self) -> str:
        """The folder (relative to what was scanned) whose checkpoints this one is ranked with: its parent."""
        return posixpath.dirname(self.path)

    @property
    def is_ranked(self) -> bool:
        """Whether retention may count it: a recognised, counted unit with a number."""
        return self.layout is not Layout.UNKNOWN and self.counted and self.step is not None

    @property
    def is_complete(self) -> bool:
        return self.status is Status.COMPLETE


@dataclass(frozen=True)
class RunScan:
    """Everything ``list`` knows about a run, from one listing walk and a few small reads."""

    url: str
    units: tuple[Unit, ...]
    pointers: tuple[Pointer, ...]
    warnings: tuple[str, ...]
    scanned_at: float
    file_count: int

    def unit(self, path: str) -> Unit | None:
        return next((u for u in self.units if u.path == path), None)

    def by_step(self, step: int) -> list[Unit]:
        return [u for u in self.units if u.step == step]

    @property
    def recognised(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.layout is not Layout.UNKNOWN)

    @property
    def runs(self) -> tuple[str, ...]:
        """The folders that each hold a sequence of ranked checkpoints. More than one means several runs were
        scanned together (Lightning's ``version_N/``, a folder of HF output directories): their steps restart
        and must never be ranked against each other."""
        return tuple(sorted({u.run for u in self.units if u.is_ranked}))
