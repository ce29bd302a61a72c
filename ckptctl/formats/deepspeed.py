"""DeepSpeed ZeRO checkpoints: a save dir (``latest`` + tag folders) or one tag folder.

What the model-states file of rank 0 says (shared/fixtures/zero/README.md) is enough to describe the model as
DeepSpeed's own ``zero_to_fp32`` would write it: persistent buffers, frozen parameters, trainable parameters
in ``param_shapes`` order, then tied aliases (``shared_params``). The ZeRO stage and world sizes say which rank
files must exist, so a missing one is named without opening the others. ``verify`` opens them all.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptctl.errors import IntegrityError, NotFoundError
from ckptctl.formats.model import Defect, FileFact, Inspection, TensorInfo, checked_shape, nbytes_of, numel_of
from ckptctl.formats.restricted_pickle import PickledObject, TensorRef
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_zip import read_torch_archive
from ckptctl.storage.location import POINTER_FILE_LIMIT, FileEntry, Location

MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")


@dataclass(frozen=True)
class DeepSpeedTag:
    """Where a DeepSpeed checkpoint's files are: ``tag`` folder (relative to the location) and its files."""

    tag_dir: str
    latest: str | None
    files: dict[str, FileEntry]
    """File name (inside the tag folder) -> listing entry."""


def is_deepspeed_dir(names: set[str]) -> bool:
    """A tag folder holds model-states files; a save dir holds ``latest`` naming a tag folder."""
    return any(MODEL_STATES.match(n) or OPTIM_STATES.match(n) for n in names)


def find_tag(location: Location, entries: Sequence[FileEntry]) -> DeepSpeedTag | None:
    """The tag folder to read: the location itself, or the one ``latest`` names (else the only tag)."""
    files = [e for e in entries if e.type == "file"]
    top = {e.path: e for e in files if "/" not in e.path}
    if is_deepspeed_dir(set(top)):
        return DeepSpeedTag("", None, top)
    latest: str | None = None
    if "latest" in top:
        latest = (
            location.read_bytes("latest", max_bytes=POINTER_FILE_LIMIT).decode("utf-8", "replace").strip()
        )
    tags = sorted(
        {e.parent for e in files if e.parent and "/" not in e.parent and is_deepspeed_dir({e.name})}
    )
    if latest is not None:
        chosen = latest
        if chosen not in tags:
            raise IntegrityError(
                f"{location.url_of('latest')} names tag {chosen!r}, which has no model or optimizer states",
                url=location.url_of("latest"),
            )
    elif len(tags) == 1:
        chosen = tags[0]
    else:
        return None
    inside = {e.name: e for e in files if e.parent == chosen}
    return DeepSpeedTag(chosen, latest, inside)


def _shapes(value: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict):
        return {}
    return {str(k): checked_shape(v, f"parameter {str(k)[:200]!r}") for k, v in value.items()}


def _zero_stage(states: dict[str, Any], tag: DeepSpeedTag) -> int | None:
    config = states.get("ds_config")
    if isinstance(config, dict):
        stage = (config.get("zero_optimization") or {}).get("stage")
        if isinstance(stage, int):
            return stage
    if any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in tag.files):
        return 3
    return None


def _training_dtype(config: Any) -> str | None:
    if not isinstance(config, dict):
        return None
    if (config.get("bf16") or {}).get("enabled"):
        return "bfloat16"
    if (config.get("fp16") or {}).get("enabled"):
        return "float16"
    return "float32"


def _world_size(value: Any) -> int:
    """A world size from the states file: a positive int (1 when absent); anything else is -1, which no tag
    can hold."""
    if value is None:
        return 1
    return value if type(value) is int and value >= 1 else -1


def _shown(value: int) -> str:
    return str(value) if value.bit_length() < 64 else f"<{value.bit_length()}-bit number>"


def world_sizes(states: dict[str, Any], stage: int | None, files: int) -> tuple[int, int, str | None]:
    """``dp_world_size`` and ``mp_world_size`` from rank 0's model states, and why they cannot be this tag's
    (None when they can). Every rank writes a file (an optimizer file per dp x mp rank under ZeRO, a model file
    per mp rank), so a tag of ``files`` files cannot hold more ranks: check this before building a name from
    those numbers (``10**9`` ranks would be a billion names)."""
    dp = _world_size(states.get("dp_world_size"))
    mp = _world_size(states.get("mp_world_size"))
    ranks = dp * mp if stage in (1, 2, 3) else mp
    if dp >= 1 and mp >= 1 and ranks <= max(1, files):
        return dp, mp, None
    return (
        dp,
        mp,
        f"says dp_world_size={_shown(dp)}, mp_world_size={_shown(mp)}, but the tag holds {files} files "
        "(corrupt, or not this tag's states)",
    )


def _group_numels(optimizer: dict[str, Any]) -> list[int] | None:
    """Elements of each flat fp32 group a rank's optimizer file holds (stage 1/2 and BF16_Optimizer:
    ``single_partition_of_fp32_groups``; stage 3: ``fp32_flat_groups``), or None when it holds neither."""
    groups = optimizer.get("single_partition_of_fp32_groups", optimizer.get("fp32_flat_groups"))
    if not isinstance(groups, list) or not all(isinstance(g, TensorRef) for g in groups):
        return None
    return [numel_of(g.shape) for g in groups]


def partition_problems(
    stage: int, dp: int, param_shapes: list[Any], optimizers: dict[str, dict[str, Any]]
) -> list[str]:
    """Whether the dp ranks' fp32 partitions add up to the model's trainable parameters, group by group
    (fixtures/zero/README.md, "Flattening"): stage 1/2 concatenate a group's parameters (plus alignment pads)
    and pad the group to a multiple of 2 x dp, and each rank saves its slice with or without that padding;
    stage 3 splits every parameter into dp slices of ceil(numel / dp). An optimizer file of another model (or
    world size) fails this; the model states alone cannot tell."""
    per_rank = [_group_numels(o) for o in optimizers.values()]
    if any(n is None for n in per_rank) or not param_shapes:
        return []
    counts = {len(n) for n in per_rank if n is not None}
    if counts != {len(param_shapes)}:
        return [
            f"optimizer files hold {sorted(counts)} parameter groups, the model states {len(param_shapes)}"
        ]
    problems = []
    first = next(iter(optimizers.values()))
    paddings = first.get("param_alignment_paddings")
    for index, group in enumerate(param_shapes):
        shapes = list(_shapes(group).values())
        total = sum(n[index] for n in per_rank if n is not None)
        if stage == 3:
            low = sum(numel_of(s) for s in shapes)
            high = sum(-(-numel_of(s) // dp) * dp for s in shapes)
        else:
            pads = paddings[index] if isinstance(paddings, list) and index < len(paddings) else []
            low = sum(numel_of(s) for s in shapes) + sum(p for p in pads if type(p) is int)
            high = -(-low // (2 * dp)) * 2 * dp
        if not low <= total <= high:
            problems.append(
                f"optimizer partitions of group {index} hold {total} elements across {dp} ranks, the model's "
                f"parameters need {low} (another model's optimizer state?)"
            )
    return problems


def expected_rank_files(stage: int | None, dp: int, mp: int, bf16_prefix: bool) -> list[str]:
    """The files DeepSpeed writes into a tag for these world sizes (fixtures/zero/README.md, on-disk format)."""
    prefix = "bf16_" if bf16_prefix else ""
    names = []
    for m in range(mp):
        if stage == 3:
            names += [f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt" for d in range(dp)]
        else:
            names.append(f"mp_rank_{m:02d}_model_states.pt")
        if stage in (1, 2, 3):
            names += [f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in range(dp)]
    return names


def inspect_deepspeed(
    location: Location, entries: Sequence[FileEntry], *, verify: bool = False
) -> Inspection:
    """Describe a DeepSpeed checkpoint from rank 0's model states (``verify``: and every rank file)."""
    tag = find_tag(location, entries)
    if tag is None:
        raise NotFoundError(f"no DeepSpeed tag folder found in {location.url} (no `latest` and several tags)")
    model_files = sorted(n for n in tag.files if MODEL_STATES.match(n))
    if not model_files:
        raise IntegrityError(
            f"{location.url_of(tag.tag_dir)}: no *_model_states.pt file (the tag is incomplete)",
            url=location.url_of(tag.tag_dir),
        )
    first = model_files[0]

    def rel(name: str) -> str:
        return posixpath.join(tag.tag_dir, name) if tag.tag_dir else name

    archive = read_torch_archive(FileSource(location, rel(first), tag.files[first].size))
    states = archive.obj if isinstance(archive.obj, dict) else {}
    module = states.get("module")
    if not isinstance(module, dict):
        module = {}
    refs: dict[str, TensorRef] = {str(k): v for k, v in module.items() if isinstance(v, TensorRef)}
    stage = _zero_stage(states, tag)
    dp, mp, implausible = world_sizes(states, stage, len(tag.files))
    config = states.get("ds_config")
    notes: list[str] = []

    def info(name: str, shape: tuple[int, ...], role: str, alias_of: str | None = None) -> TensorInfo:
        ref = refs.get(alias_of or name)
        dtype = ref.dtype if ref is not None else (_training_dtype(config) or "float32")
        return TensorInfo(name, dtype, shape, nbytes_of(dtype, shape), role, alias_of)

    tensors: list[TensorInfo] = []
    buffer_names = [str(n) for n in states.get("buffer_names") or []]
    for name in buffer_names:
        if name in refs:
            tensors.append(info(name, refs[name].shape, "buffer"))
    param_shapes: dict[str, tuple[int, ...]] = {}
    for group in states.get("param_shapes") or []:
        param_shapes.update(_shapes(group))
    shared = {str(k): str(v) for k, v in (states.get("shared_params") or {}).items()}
    frozen = _shapes(states.get("frozen_param_shapes"))
    module_only_frozen: list[str] = []
    if not frozen and stage in (1, 2):
        # Stage 1 (and saves with exclude_frozen_parameters) record no frozen_param_shapes: what is in the
        # module and is neither trained, a buffer nor an alias is a frozen parameter only `module` holds.
        known = set(param_shapes) | set(buffer_names) | set(shared)
        module_only_frozen = [n for n in refs if n not in known]
        frozen = {n: refs[n].shape for n in module_only_frozen}
        if module_only_frozen:
            notes.append(
                f"{len(module_only_frozen)} frozen tensor(s) are only in the module weights (no "
                "frozen_param_shapes saved); DeepSpeed's zero_to_fp32 leaves them out"
            )
    tensors += [info(name, shape, "frozen") for name, shape in frozen.items()]
    tensors += [info(name, shape, "param") for name, shape in param_shapes.items()]
    owners = {t.name: t for t in tensors}
    for alias, owner in shared.items():
        if owner in owners:
            tensors.append(info(alias, owners[owner].shape, "param", alias_of=owner))

    present_optim = [n for n in tag.files if OPTIM_STATES.match(n)]
    bf16_prefix = any(n.startswith("bf16_") for n in present_optim) or (
        not present_optim and _training_dtype(config) == "bfloat16"
    )
    defects: list[Defect] = []
    if implausible is not None:
        # One defect, and the rank files are not enumerated.
        defects.append(Defect(rel(first), implausible))
        expected = []
    else:
        expected = expected_rank_files(stage, dp, mp, bf16_prefix)
    missing = [n for n in expected if n not in tag.files]
    defects += [Defect(rel(n), "rank file missing") for n in missing]
    defects += [
        Defect(rel(n), "empty rank file") for n in expected if n in tag.files and tag.files[n].size == 0
    ]
    verified_stage = None
    partitions: dict[str, dict[str, Any]] = {}
    if verify:
        defects += archive.check_members()
        for name in expected:
            if name == first or name not in tag.files or tag.files[name].size == 0:
                continue
            try:
                other = read_torch_archive(FileSource(location, rel(name), tag.files[name].size))
            except IntegrityError as exc:
                defects.append(Defect(rel(name), exc.message.split(": ", 1)[-1]))
                continue
            defects += other.check_members()
            optimizer = other.obj.get("optimizer_state_dict") if isinstance(other.obj, dict) else None
            if isinstance(optimizer, dict) and isinstance(optimizer.get("zero_stage"), PickledObject):
                verified_stage = optimizer["zero_stage"].args[0] if optimizer["zero_stage"].args else None
            match = OPTIM_STATES.match(name)
            if match and int(match["mp"]) == 0 and isinstance(optimizer, dict):
                partitions[name] = optimizer
    if verified_stage is not None and stage is not None and verified_stage != stage:
        defects.append(
            Defect(rel(first), f"ds_config says stage {stage}, optimizer files say {verified_stage}")
        )
    if verify and implausible is None and len(partitions) == dp and stage in (1, 2, 3):
        defects += [
            Defect(rel(sorted(partitions)[0]), problem)
            for problem in partition_problems(stage, dp, list(states.get("param_shapes") or []), partitions)
        ]

    files = tuple(
        FileFact(rel(n), e.size, "rank" if n in expected else "other") for n, e in sorted(tag.files.items())
    )
    facts = {
        "zero": {
            "stage": stage,
            "dp_world_size": dp,
            "mp_world_size": mp,
            "ds_version": states.get("ds_version"),
            "tag": tag.tag_dir or posixpath.basename(location.root.rstrip("/")),
            "latest": tag.latest,
            "global_steps": states.get("global_steps"),
            "global_samples": states.get("global_samples"),
            "training_dtype": _training_dtype(config),
            "shared_params": shared,
            "frozen_params": list(frozen),
            "frozen_params_in_module_only": module_only_frozen,
            "rank_files": {
                "expected": [rel(n) for n in expected],
                "missing": [rel(n) for n in missing],
            },
        }
    }
    return Inspection(
        url=location.url,
        format="deepspeed",
        files=files,
        tensors=tuple(tensors),
        metadata={"ds_config": config} if isinstance(config, dict) else {},
        facts=facts,
        defects=tuple(defects),
        notes=tuple(notes),
        verified=verify,
    )
