"""Recognise checkpoint units by their names and marker files, one rule per trainer family.

The rules follow ``shared/notes/retention-and-layouts.md`` §2. Recognition uses names and the listing only; it
never guesses: an entry no rule matches is reported as ``unknown``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ckptctl.catalog.model import Layout, Ordinal, Status
from ckptctl.formats.dcp import PER_RANK_METADATA
from ckptctl.formats.dcp_hf import judge_names as judge_dcp_hf_names
from ckptctl.formats.deepspeed import OPTIM_STATES

CHECKPOINT_FILE_SUFFIXES = (
    ".pt",
    ".pth",
    ".bin",
    ".ckpt",
    ".safetensors",
    ".tar",
    ".pkl",
    ".distcp",
    ".nemo",
)
ZIP_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")

# Files and folders at run level that are not checkpoints and are never listed as unknown.
AUXILIARY_FILE_SUFFIXES = (
    ".json",
    ".jsonl",
    ".yaml",
    ".yml",
    ".txt",
    ".md",
    ".csv",
    ".log",
    ".py",
    ".sh",
    ".toml",
)
AUXILIARY_DIR_NAMES = {
    "logs",
    "runs",
    "wandb",
    "tensorboard",
    "tb",
    "tb_logs",
    "events",
    "plots",
    "code",
    ".git",
}
POINTER_FILE_NAMES = {"latest", "latest_universal", "latest_checkpointed_iteration.txt"}
UNFINISHED_SUFFIX = "-unfinished"
"""The in-progress marker beside a checkpoint (``checkpoint-400-unfinished``): present, the checkpoint is being
written."""


@dataclass(frozen=True)
class NameMatch:
    """What a unit's name alone says."""

    layout: Layout
    step: int | None
    epoch: int | None = None
    in_progress_reason: str | None = None
    ordinal: Ordinal = "step"
    last_copy: bool = False
    """A fixed-name copy of the newest state (Lightning ``last.ckpt``): a pointer, not a checkpoint to rank."""


_DIR_RULES: Sequence[tuple[re.Pattern[str], Layout, str | None]] = [
    (re.compile(r"^checkpoint-(?P<step>\d+)$"), Layout.HF_TRAINER, None),
    (re.compile(r"^checkpoint-(?P<step>\d+)-tmp$"), Layout.HF_TRAINER, "temporary name (-tmp)"),
    (re.compile(r"^global_step(?P<step>\d+)$"), Layout.DEEPSPEED, None),
    (re.compile(r"^step-(?P<step>\d+)$"), Layout.DCP, None),
    (re.compile(r"^iter_(?P<step>\d+)$"), Layout.MEGATRON, None),
    (re.compile(r"^step_(?P<step>\d+)$"), Layout.OPEN_INSTRUCT, None),
    (re.compile(r"^epoch_(?P<epoch>\d+)$"), Layout.OPEN_INSTRUCT, None),
    (re.compile(r"^step(?P<step>\d+)$"), Layout.OLMO_CORE, None),
    (re.compile(r"^step(?P<step>\d+)-tmp$"), Layout.OLMO_CORE, "temporary name (-tmp)"),
    (
        re.compile(r"^(?P<step>\d+)\.orbax-checkpoint-tmp-\d+$"),
        Layout.ORBAX,
        "temporary name (.orbax-checkpoint-tmp)",
    ),
    (re.compile(r"^ep(?P<epoch>\d+)-ba(?P<step>\d+)$"), Layout.COMPOSER, None),
    (re.compile(r"^.+--.*\bstep=(?P<step>\d+)\b.*$"), Layout.NEMO, None),
    (re.compile(r"^epoch=(?P<epoch>\d+)-step=(?P<step>\d+)\b.*\.ckpt$"), Layout.LIGHTNING, None),
    # Accelerate ``automatic_checkpoint_naming``: N counts saves (checkpoint_0 is the first save), not steps.
    (re.compile(r"^checkpoint_(?P<step>\d+)$"), Layout.ACCELERATE, None),
]
_SAVE_COUNTED = frozenset({Layout.ACCELERATE})
_LAST_COPY = re.compile(r"^last(-v\d+)?\.ckpt$")

_FILE_RULES: Sequence[tuple[re.Pattern[str], Layout]] = [
    (re.compile(r"^epoch=(?P<epoch>\d+)-step=(?P<step>\d+)\b.*\.ckpt$"), Layout.LIGHTNING),
    (re.compile(r"^ep(?P<epoch>\d+)-ba(?P<step>\d+)(-rank\d+)?\.pt$"), Layout.COMPOSER),
]

_STEP_IN_NAME = re.compile(
    r"(?:^|[^a-z])(?:global_step|step|iter|iteration|it)[_\-=]?(?P<n>\d+)", re.IGNORECASE
)
_EPOCH_IN_NAME = re.compile(r"(?:^|[^a-z])epoch[_\-=]?(?P<n>\d+)", re.IGNORECASE)
_DIGITS = re.compile(r"^(?P<step>\d+)$")
_MEGATRON_RANK_DIR = re.compile(r"^mp_rank_\d+(_\d+)?$")
_TRAILING_DIGITS = re.compile(r"(?P<n>\d+)$")

ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")
# Accelerate's save_state writes the weights, optimizer and scheduler, then one random_states_<process>.pkl per
# process, last (accelerate/checkpointing.py save_accelerator_state).
_ACCELERATE_RNG = re.compile(r"^random_states_(?P<n>\d+)\.pkl$")
_ACCELERATE_STATE = frozenset(
    {"model.safetensors", "pytorch_model.bin", "optimizer.bin", "scheduler.bin", "pytorch_model_fsdp_0"}
)


def _int(match: re.Match[str], group: str) -> int | None:
    value = match.groupdict().get(group)
    return int(value) if value is not None else None


def match_dir_name(name: str) -> NameMatch | None:
    """A folder's layout and step from its name alone, or None."""
    for pattern, layout, in_progress in _DIR_RULES:
        found = pattern.match(name)
        if found:
            ordinal: Ordinal = "save" if layout in _SAVE_COUNTED else "step"
            return NameMatch(layout, _int(found, "step"), _int(found, "epoch"), in_progress, ordinal)
    return None


def match_file_name(name: str) -> NameMatch | None:
    """A single-file checkpoint's layout and step from its name, or None for a non-checkpoint file."""
    if _LAST_COPY.match(name):
        return NameMatch(Layout.LIGHTNING, None, last_copy=True)
    for pattern, layout in _FILE_RULES:
        found = pattern.match(name)
        if found:
            return NameMatch(layout, _int(found, "step"), _int(found, "epoch"))
    if not name.endswith(CHECKPOINT_FILE_SUFFIXES) or name.endswith(".distcp"):
        return None
    step = _STEP_IN_NAME.search(name)
    epoch = _EPOCH_IN_NAME.search(name)
    return NameMatch(
        Layout.PLAIN_FILE,
        int(step.group("n")) if step else None,
        int(epoch.group("n")) if epoch else None,
    )


def match_dir_contents(name: str, child_names: set[str]) -> NameMatch | None:
    """A folder with an unrecognised name that its marker files identify (a DeepSpeed tag with a custom
    name, an Orbax ``<step>/`` or ``<prefix>_<step>/``, a DCP folder...)."""
    trailing = _TRAILING_DIGITS.search(name)
    step = int(trailing.group("n")) if trailing else None
    if any(c.endswith("model_states.pt") for c in child_names):
        return NameMatch(Layout.DEEPSPEED, step)
    if any(m in child_names for m in ORBAX_MARKERS):
        return NameMatch(Layout.ORBAX, step)
    if ".metadata" in child_names and any(c.endswith(".distcp") for c in child_names):
        return NameMatch(Layout.DCP, step)
    if "trainer_state.json" in child_names:
        return NameMatch(Layout.HF_TRAINER, step)
    if ".metadata.json" in child_names and "model_and_optim" in child_names:
        return NameMatch(Layout.OLMO_CORE, step)
    if any(_ACCELERATE_RNG.match(c) for c in child_names) and child_names & _ACCELERATE_STATE:
        # ``save_state(dir)`` without automatic naming: the name's digits mean nothing we know.
        return NameMatch(Layout.ACCELERATE, None)
    if any(_MEGATRON_RANK_DIR.match(c) for c in child_names):
        # Megatron's legacy format: iter_NNNNNNN/ or release/ holding mp_rank_XX[_YYY]/model_optim_rng.pt.
        return NameMatch(Layout.MEGATRON, step)
    return None


def is_orbax_step_dir(name: str, sibling_layouts: set[Layout]) -> NameMatch | None:
    """A bare ``<step>/`` folder is Orbax only when a sibling is already known to be Orbax (a finalised step
    or a tmp dir): a lone digit-named folder is not guessed."""
    found = _DIGITS.match(name)
    if found and Layout.ORBAX in sibling_layouts:
        return NameMatch(Layout.ORBAX, int(found.group("step")))
    return None


def is_auxiliary_file(name: str) -> bool:
    return (
        name in POINTER_FILE_NAMES
        or name.endswith(AUXILIARY_FILE_SUFFIXES)
        or name.endswith(UNFINISHED_SUFFIX)
        or name.startswith("events.out.tfevents")
        or name.startswith(".")
    )


def is_auxiliary_dir(name: str) -> bool:
    return name in AUXILIARY_DIR_NAMES or name.startswith(".")


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str


def judge_dir(layout: Layout, rel_files: set[str], name: str, empty: frozenset[str] = frozenset()) -> Verdict:
    """Completeness of a folder unit from the names of the files inside it (paths relative to the unit).

    Each family's own marker decides; where a family has none, the file that its trainer writes last stands
    in for one (HF Trainer writes ``trainer_state.json`` after the weights and optimizer). ``empty`` names the
    zero-byte files: a JSON marker of zero bytes is a save killed while writing it.
    """
    top = {f for f in rel_files if "/" not in f}
    if not rel_files:
        return Verdict(Status.INCOMPLETE, "empty folder")
    if layout is Layout.HF_TRAINER:
        if "trainer_state.json" not in top:
            return Verdict(Status.INCOMPLETE, "no trainer_state.json (HF Trainer writes it last)")
        if "trainer_state.json" in empty:
            return Verdict(Status.INCOMPLETE, "trainer_state.json is empty (the save was cut off writing it)")
        if not any(f.endswith(CHECKPOINT_FILE_SUFFIXES) for f in rel_files):
            return Verdict(Status.INCOMPLETE, "trainer_state.json but no weights")
        return Verdict(Status.COMPLETE, "trainer_state.json present")
    if layout in (Layout.DCP, Layout.COMPOSER):
        # DCP's HF writer (torchtitan ``step-N/sharded/``) writes no .metadata; its rank files decide.
        hf_writer = judge_dcp_hf_names(rel_files, empty) if layout is Layout.DCP else None
        if hf_writer is not None:
            whole, reason = hf_writer
            return Verdict(Status.COMPLETE if whole else Status.INCOMPLETE, reason)
        if ".metadata" in top:
            return Verdict(Status.COMPLETE, ".metadata present")
        if "model.safetensors.index.json" in top:
            return Verdict(Status.COMPLETE, "model.safetensors.index.json present")
        if any(PER_RANK_METADATA.match(f) for f in top):
            return _per_rank_dcp(top, empty)
        if ".metadata.tmp" in top:
            return Verdict(Status.INCOMPLETE, ".metadata.tmp not yet renamed to .metadata")
        return Verdict(Status.INCOMPLETE, "no .metadata (DCP writes it last)")
    if layout is Layout.ORBAX:
        for marker in ORBAX_MARKERS:
            if marker in top:
                return Verdict(Status.COMPLETE, f"{marker} present")
        return Verdict(Status.INCOMPLETE, "no _CHECKPOINT_METADATA or commit_success.txt")
    if layout is Layout.OPEN_INSTRUCT:
        if "COMPLETED" in top:
            return Verdict(Status.COMPLETE, "COMPLETED marker present")
        return Verdict(Status.INCOMPLETE, "no COMPLETED marker")
    if layout is Layout.OLMO_CORE:
        if ".metadata.json" in empty:
            return Verdict(Status.INCOMPLETE, ".metadata.json is empty (the save was cut off writing it)")
        if ".metadata.json" in top:
            return Verdict(Status.COMPLETE, ".metadata.json present (written last)")
        return Verdict(Status.INCOMPLETE, "no .metadata.json (OLMo-core writes it last)")
    if layout is Layout.NEMO:
        if "weights/.metadata" in rel_files or "model_weights.ckpt" in top:
            return Verdict(Status.COMPLETE, "weights/.metadata present, no -unfinished marker")
        return Verdict(Status.INCOMPLETE, "no weights/.metadata")
    if layout is Layout.DEEPSPEED:
        return judge_deepspeed_tag(top)
    if layout is Layout.ACCELERATE:
        return _judge_accelerate(rel_files, top)
    if layout is Layout.MEGATRON:
        has_weights = any(f.endswith("model_optim_rng.pt") for f in rel_files) or ".metadata" in top
        if not has_weights:
            return Verdict(Status.INCOMPLETE, "no model_optim_rng.pt or .metadata")
        return Verdict(Status.UNKNOWN, "no latest_checkpointed_iteration.txt to confirm it")
    if layout is Layout.LIGHTNING:
        if "latest" in top or any(posixpath.basename(f) == "latest" for f in rel_files):
            return Verdict(Status.COMPLETE, "DeepSpeed latest present")
        if ".metadata" in top:
            return Verdict(Status.COMPLETE, ".metadata present")
        return Verdict(Status.UNKNOWN, "folder-shaped .ckpt with no marker")
    return Verdict(Status.UNKNOWN, "unrecognised layout")


def _judge_accelerate(rel_files: set[str], top: set[str]) -> Verdict:
    processes = sorted(int(m.group("n")) for f in top if (m := _ACCELERATE_RNG.match(f)))
    if not any(f.endswith((".safetensors", ".bin")) or "/" in f for f in rel_files):
        return Verdict(Status.INCOMPLETE, "no model or optimizer state")
    if not processes:
        return Verdict(Status.INCOMPLETE, "no random_states_*.pkl (Accelerate writes them last)")
    missing = sorted(set(range(max(processes) + 1)) - set(processes))
    if missing:
        return Verdict(Status.INCOMPLETE, f"missing random_states for process {', '.join(map(str, missing))}")
    return Verdict(Status.COMPLETE, "random_states_*.pkl present (written last)")


def judge_deepspeed_tag(top: set[str]) -> Verdict:
    """A DeepSpeed tag has model states and a contiguous set of ZeRO rank files; whether it is committed is
    decided by ``latest`` (see ``pointers``), so a well-formed tag is UNKNOWN until a pointer confirms it."""
    if not any(f.endswith("model_states.pt") for f in top):
        return Verdict(Status.INCOMPLETE, "no *_model_states.pt")
    ranks = sorted(int(m.group("dp")) for f in top if (m := OPTIM_STATES.match(f)))
    if ranks:
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        if missing:
            return Verdict(
                Status.INCOMPLETE, f"missing ZeRO rank file(s) for dp rank {', '.join(map(str, missing))}"
            )
    return Verdict(Status.UNKNOWN, "no latest file names this tag")


_DCP_DATA = re.compile(r"^__(\d+)_\d+\.distcp$")


def _per_rank_dcp(top: set[str], empty: frozenset[str]) -> Verdict:
    """A DCP save made with ``use_collectives=False``: each rank writes its data files, then its own
    ``__R.metadata``; no file records the world size. Complete when the ranks with metadata are 0..N-1, each
    non-empty, and every rank that wrote data also wrote its metadata; a save cut mid-way leaves data without
    metadata or a gap in the ranks. A last rank that wrote nothing at all cannot be seen from names; consolidate
    then refuses the tensors whose chunks no longer tile."""
    with_metadata = {int(m.group(1)) for f in top if (m := PER_RANK_METADATA.match(f))}
    with_data = {int(m.group(1)) for f in top if (m := _DCP_DATA.match(f))}
    blank = sorted(f for f in top & empty if PER_RANK_METADATA.match(f))
    if blank:
        return Verdict(Status.INCOMPLETE, f"{blank[0]} is empty (the save was cut off writing it)")
    if with_data - with_metadata:
        return Verdict(
            Status.INCOMPLETE,
            f"rank {min(with_data - with_metadata)} wrote data but no __N.metadata (use_collectives=False)",
        )
    if with_metadata != set(range(len(with_metadata))):
        missing = min(set(range(max(with_metadata) + 1)) - with_metadata)
        return Verdict(Status.INCOMPLETE, f"no __{missing}.metadata among the per-rank metadata files")
    return Verdict(
        Status.COMPLETE,
        f"per-rank metadata of ranks 0..{len(with_metadata) - 1} (use_collectives=False; no global .metadata)",
    )
