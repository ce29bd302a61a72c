"""DeepSpeed ZeRO checkpoints: a save dir (``latest`` + tag folders) or one tag folder.

What the model-states file of rank 0 says (shared/fixtures/zero/README.md) is enough to describe the model as
DeepSpeed's own ``zero_to_fp32`` would write it: persistent buffers, frozen parameters, trainable parameters
in ``param_shapes`` order, then tied aliases (``shared_params``). The ZeRO stage and world sizes say which rank
files must exist, so a missing one is named without opening the others. ``verify`` opens them all.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ckptctl.errors import IntegrityError, NotFoundError, RefusedError
from ckptctl.formats.model import Defect, FileFact, Inspection, TensorInfo, checked_shape, nbytes_of, numel_of
from ckptctl.formats.restricted_pickle import PickledObject, TensorRef
from ckptctl.formats.source import FileSource
from ckptctl.formats.tensor_layout import Range, TensorPlan, TensorSource, is_contiguous
from ckptctl.formats.torch_zip import TensorRecord, TorchArchive, read_torch_archive
from ckptctl.storage.location import POINTER_FILE_LIMIT, FileEntry, Location

MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_model_states\.pt$")
LIGHTNING_WRAPPER = "_forward_module."
"""The prefix Lightning < 2.1's DeepSpeed strategy gave every name (its module wrapper); its converter strips it."""
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


def looks_like_deepspeed(entries: Sequence[FileEntry]) -> bool:
    """A DeepSpeed save or tag folder: model states, or the ``latest`` pointer (anywhere in the listing)."""
    return any(e.path.endswith("model_states.pt") or e.path == "latest" for e in entries)


def find_tag(location: Location, entries: Sequence[FileEntry], tag: str | None = None) -> DeepSpeedTag | None:
    """The tag folder to read: ``tag`` when given, else the location itself, or the one ``latest`` names (else
    the only tag); None when there is no tag or several and no ``latest``."""
    files = [e for e in entries if e.type == "file"]
    top = {e.path: e for e in files if "/" not in e.path}
    if tag is not None:
        inside = {e.name: e for e in files if e.parent == tag}
        if not inside:
            raise NotFoundError(f"no tag {tag!r} in {location.url}", url=location.url)
        return DeepSpeedTag(tag, None, inside)
    if is_deepspeed_dir(set(top)):
        return DeepSpeedTag("", None, top)
    latest: str | None = None
    if "latest" in top:
        latest = (
            location.read_bytes("latest", max_bytes=POINTER_FILE_LIMIT).decode("utf-8", "replace").strip()
        )
    tags = tag_folders(files)
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


def tag_folders(files: Sequence[FileEntry]) -> list[str]:
    """The folders directly under the location that hold DeepSpeed rank files."""
    return sorted(
        {e.parent for e in files if e.parent and "/" not in e.parent and is_deepspeed_dir({e.name})}
    )


def require_tag(location: Location, entries: Sequence[FileEntry], tag: str | None) -> DeepSpeedTag:
    """``find_tag``, or NotFoundError saying why there is no one tag to read (none, or several and no
    ``latest``)."""
    found = find_tag(location, entries, tag)
    if found is not None:
        return found
    tags = tag_folders([e for e in entries if e.type == "file"])
    if not tags:
        raise NotFoundError(
            f"{location.url} is not a DeepSpeed checkpoint (no *_model_states.pt, no latest)",
            url=location.url,
        )
    raise NotFoundError(
        f"{location.url} has several tags ({', '.join(tags)}) and no latest file",
        url=location.url,
        hint="pass --tag",
    )


def _is_universal(rels: set[str]) -> bool:
    from ckptctl.formats.deepspeed_universal import is_universal_folder

    return is_universal_folder(rels)


def _is_zero3_model(name: str) -> bool:
    """ZeRO-3 writes one model-states file per data-parallel rank (``zero_pp_rank_D_mp_rank_M_...``)."""
    match = MODEL_STATES.match(name)
    return match is not None and match.group("dp") is not None


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
    lead = f"{tag.tag_dir}/" if tag.tag_dir else ""
    # ds_to_universal keeps only the model states beside zero/<param>/fp32.pt: no optimizer rank files.
    universal = _is_universal({e.path[len(lead) :] for e in entries if e.path.startswith(lead)})
    dp, mp, implausible = world_sizes(states, None if universal and stage != 3 else stage, len(tag.files))
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
        if universal:
            expected = [n for n in expected if MODEL_STATES.match(n)]
            notes.append("a DeepSpeed universal checkpoint (ds_to_universal): one fp32.pt per parameter")
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
            "universal": universal,
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


# --- ZeRO shards as tensor sources (what consolidate and extract-lora read) ---


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _archive(location: Location, rel: str, sizes: dict[str, int]) -> TorchArchive:
    return read_torch_archive(FileSource(location, rel, sizes[rel]))


def _records(archive: TorchArchive) -> dict[tuple[Any, ...], TensorRecord]:
    return {record.path: record for record in archive.tensors}


def _range(archive: TorchArchive, record: TensorRecord, first: int, count: int) -> Range:
    """Elements [first, first + count) of a contiguous tensor, as a byte range of its file."""
    if not is_contiguous(record.shape, record.stride):
        raise IntegrityError(f"{archive.source.name}: tensor {record.name} is not contiguous")
    start = archive.tensor_byte_offset(record) + first * record.itemsize
    return Range(archive.source.rel, start, start + count * record.itemsize)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value)


def refuse_tensor_parallel(location: Location, folder: str, mp: int) -> None:
    """A save with ``mp_world_size`` > 1 holds each weight split across tensor-parallel ranks by the trainer's
    own rules (Megatron's, which DeepSpeed does not record): reading mp rank 0 alone would write a fraction of
    the model, so it is refused, for ZeRO and universal checkpoints alike."""
    if mp > 1:
        raise RefusedError(
            f"{location.url_of(folder)} is a tensor-parallel save (mp_world_size={mp}); ckptctl merges ZeRO "
            "data-parallel shards only, and merging mp rank 0 alone would write a fraction of the model",
            url=location.url,
            hint="merge the tensor-parallel ranks with the trainer's own tools first (Megatron/DeepSpeed)",
        )


def plan_zero(
    location: Location,
    *,
    tag: str | None = None,
    exclude_frozen: bool = False,
    entries: Sequence[FileEntry] | None = None,
) -> TensorPlan:
    """Find every tensor's bytes in the shards, reading only headers and pickles (no tensor data).
    ``entries``: the location's listing when the caller has one (else one walk)."""
    listing = location.walk() if entries is None else entries
    found = require_tag(location, listing, tag)
    tag_rel = found.tag_dir
    prefix = f"{tag_rel}/" if tag_rel else ""
    sizes = {prefix + name: e.size for name, e in found.files.items()}
    here = sorted(found.files, key=_natural)
    optim = [n for n in here if OPTIM_STATES.match(n)]
    models = [n for n in here if n.endswith("model_states.pt")]
    if not models:
        raise NotFoundError(
            f"{location.url_of(tag_rel)} is not a DeepSpeed checkpoint tag (no *_model_states.pt)"
        )
    if not optim:
        # A universal folder keeps only the model states beside zero/<param>/fp32.pt (extract-lora's path here).
        from ckptctl.formats.deepspeed_universal import is_universal_folder, plan_universal

        if is_universal_folder({e.path[len(prefix) :] for e in listing if e.path.startswith(prefix)}):
            return plan_universal(location, tag_rel, listing)
        raise IntegrityError(f"{location.url_of(tag_rel)}: no ZeRO optimizer files (*_optim_states.pt)")
    model0 = _archive(location, prefix + models[0], sizes)
    state = model0.obj if isinstance(model0.obj, dict) else {}
    dp, mp, implausible = world_sizes(state, 3 if any(_is_zero3_model(n) for n in models) else 2, len(here))
    if "dp_world_size" in state and implausible is not None:
        # Counts from inside the file are bounded by the files there are, before any name is built from them.
        raise IntegrityError(f"{location.url_of(prefix + models[0])}: {implausible}", url=location.url)
    refuse_tensor_parallel(location, tag_rel, mp)
    world = dp if "dp_world_size" in state else len(optim)
    ranks = sorted(int(OPTIM_STATES.match(n).group("dp")) for n in optim)  # type: ignore[union-attr]
    bf16 = optim[0].startswith("bf16_")
    expected = [f"{'bf16_' if bf16 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    missing = [name for name in expected if name not in here]
    if missing:
        raise IntegrityError(
            f"{location.url_of(tag_rel)}: missing rank file(s) {', '.join(missing)} "
            f"(expected world size {world}, found ranks {ranks})",
            url=location.url,
        )
    if len(ranks) != world:
        raise IntegrityError(
            f"{location.url_of(tag_rel)}: optimizer files for ranks {ranks}, but the model states say world size "
            f"{world}: files from two saves are mixed",
            url=location.url,
        )
    optims = [_archive(location, prefix + name, sizes) for name in expected]
    osd = [a.obj.get("optimizer_state_dict", {}) if isinstance(a.obj, dict) else {} for a in optims]
    stage3 = "fp32_flat_groups" in osd[0]
    mismatched = partition_problems(
        3 if stage3 else 2,
        world,
        list(state.get("param_shapes") or []),
        dict(zip(expected, osd, strict=True)),
    )
    if mismatched:
        # Another model's (or another save's) optimizer files: assembling would write wrong weights.
        raise IntegrityError(f"{location.url_of(tag_rel)}: {mismatched[0]}", url=location.url)
    partition = osd[0].get("partition_count")
    count = max(partition) if isinstance(partition, list) else int(partition or world)
    if count != world:
        raise IntegrityError(
            f"{location.url_of(tag_rel)}: optimizer files were written by {count} ranks, the model states say {world}"
        )
    param_shapes = [{k: _shape(v) for k, v in group.items()} for group in state.get("param_shapes") or []]
    plan = TensorPlan(
        tag_rel or posixpath.basename(location.root),
        "zero",
        [],
        stage=3 if stage3 else 2,
        world_size=world,
        default_dtype="float32",
    )
    plan.tensors += model_state_tensors(
        location,
        prefix,
        here,
        sizes,
        model0,
        world,
        stage3,
        exclude_frozen=exclude_frozen,
        warnings=plan.warnings,
    )
    # 3. trainable parameters from the fp32 masters
    if stage3:
        plan.tensors += _stage3(location, optims, param_shapes, world)
    else:
        plan.tensors += _stage12(location, optims, osd, param_shapes)
    plan.aliases = {str(k): str(v) for k, v in (state.get("shared_params") or {}).items()}
    config = state.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    if isinstance(zero, dict) and isinstance(zero.get("stage"), int):
        plan.stage = zero["stage"]
    if is_lightning_save(state):
        lightning_names(plan)
        plan.tag = posixpath.join(posixpath.basename(location.root.rstrip("/")), tag_rel)
    return plan


def is_lightning_save(states: dict[str, Any]) -> bool:
    """Lightning's DeepSpeed strategy saves ``epoch=E-step=S.ckpt/`` as a DeepSpeed save dir (``latest`` ->
    tag ``checkpoint``) and puts its own client state (``pytorch-lightning_version``, ``loops``...) beside
    DeepSpeed's keys in rank 0's model states: that key, not the folder's name, says it is Lightning's."""
    return "pytorch-lightning_version" in states


def lightning_names(plan: TensorPlan) -> None:
    """Names as Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` writes them: ``_forward_module.``
    removed where a key starts with it (Lightning < 2.1 wrapped the module; 2.1+ saves ``model.``... names,
    left as they are). Aliases are renamed the same way, both sides."""

    def strip(name: str) -> str:
        return name.removeprefix(LIGHTNING_WRAPPER)

    plan.tensors = [replace(t, name=strip(t.name)) for t in plan.tensors]
    plan.aliases = {strip(k): strip(v) for k, v in plan.aliases.items()}


def model_state_tensors(
    location: Location,
    prefix: str,
    here: list[str],
    sizes: dict[str, int],
    model0: TorchArchive,
    world: int,
    stage3: bool,
    *,
    exclude_frozen: bool,
    warnings: list[str],
) -> list[TensorSource]:
    """The tensors rank 0's model states hold in full, in ``zero_to_fp32``'s order: persistent buffers, then the
    frozen parameters (``frozen_param_fragments``; at stage 1 and under BF16_Optimizer DeepSpeed saves none,
    and the frozen parameters are taken from ``module``, where they are stored in the training dtype: frozen
    parameters never change, so those values are exact — ``zero_to_fp32`` leaves them out). A universal
    checkpoint keeps these files as they were, so it reads them here too."""
    state = model0.obj if isinstance(model0.obj, dict) else {}
    module = state.get("module") or {}
    model_records = _records(model0)
    out = []
    buffer_names = [str(n) for n in state.get("buffer_names") or []]
    for name in buffer_names:
        record = model_records.get(("module", name))
        if record is not None:
            out.append(
                TensorSource(
                    location, name, record.dtype, record.shape, (_range(model0, record, 0, record.numel),)
                )
            )
    frozen_shapes = state.get("frozen_param_shapes")
    if frozen_shapes is not None:
        if not exclude_frozen:
            out += _frozen(
                location,
                prefix,
                here,
                sizes,
                model0,
                {k: _shape(v) for k, v in frozen_shapes.items()},
                world,
                stage3,
            )
        return out
    trainable = {str(n) for g in state.get("param_shapes") or [] for n in g}
    known = trainable | set(buffer_names) | {str(n) for n in state.get("shared_params") or {}}
    frozen = [str(n) for n in module if str(n) not in known and ("module", n) in model_records]
    if not frozen or exclude_frozen or stage3:
        # ZeRO-3 modules hold (0,)-shaped placeholders, never values.
        return out
    for name in frozen:
        record = model_records[("module", name)]
        out.append(
            TensorSource(
                location, name, record.dtype, record.shape, (_range(model0, record, 0, record.numel),)
            )
        )
    listed = ", ".join(frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
    warnings.append(
        f"this checkpoint does not store frozen parameters in its ZeRO state (ZeRO stage 1 or BF16_Optimizer): "
        f"{len(frozen)} ({listed}) were written from the module weights of {model0.source.name}, stored in "
        f"the training dtype ({model_records[('module', frozen[0])].dtype}) and written as fp32 like the rest "
        "(an exact widening) unless another dtype is asked for; they are exact (frozen parameters never "
        "change), and DeepSpeed's zero_to_fp32 leaves them out"
    )
    return out


def _frozen(
    location: Location,
    prefix: str,
    here: list[str],
    sizes: dict[str, int],
    model0: TorchArchive,
    shapes: dict[str, tuple[int, ...]],
    world: int,
    stage3: bool,
) -> list[TensorSource]:
    if not stage3:
        records = _records(model0)
        out = []
        for name, shape in shapes.items():
            record = records[("frozen_param_fragments", name)]
            out.append(
                TensorSource(location, name, record.dtype, shape, (_range(model0, record, 0, record.numel),))
            )
        return out
    models = sorted((n for n in here if _is_zero3_model(n)), key=_natural)
    if len(models) != world:
        raise IntegrityError(f"expected {world} ZeRO-3 model state files, found {len(models)}")
    archives = [
        model0 if prefix + n == model0.source.rel else _archive(location, prefix + n, sizes) for n in models
    ]
    by_rank = [_records(a) for a in archives]
    out = []
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        pieces = []
        for archive, records in zip(archives, by_rank, strict=True):
            record = records[("frozen_param_fragments", name)]
            pieces.append(_range(archive, record, 0, min(part, record.numel)))
        out.append(
            TensorSource(
                location, name, by_rank[0][("frozen_param_fragments", name)].dtype, shape, tuple(pieces)
            )
        )
    return out


def _stage12(
    location: Location,
    optims: list[TorchArchive],
    osd: list[dict[str, Any]],
    param_shapes: list[dict[str, tuple[int, ...]]],
) -> list[TensorSource]:
    out = []
    for g, shapes in enumerate(param_shapes):
        parts = []
        for archive in optims:
            record = _records(archive)[("optimizer_state_dict", "single_partition_of_fp32_groups", g)]
            parts.append((archive, record))
        paddings = osd[0].get("param_alignment_paddings")
        pads = paddings[g] if isinstance(paddings, list) and g < len(paddings) else [0] * len(shapes)
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            out.append(TensorSource(location, name, "float32", shape, tuple(_span(parts, offset, numel))))
            offset += numel + (pads[i] if i < len(pads) else 0)
    return out


def _span(parts: list[tuple[TorchArchive, TensorRecord]], first: int, count: int) -> list[Range]:
    """Elements [first, first + count) of the concatenation of the ranks' partitions."""
    pieces, start = [], 0
    for archive, record in parts:
        end = start + record.numel
        lo, hi = max(first, start), min(first + count, end)
        if lo < hi:
            pieces.append(_range(archive, record, lo - start, hi - lo))
        start = end
    if sum(p.end - p.start for p in pieces) != count * 4:
        raise IntegrityError(
            f"the fp32 partitions hold fewer elements than the parameter shapes need ({first + count})"
        )
    return pieces


def _stage3(
    location: Location, optims: list[TorchArchive], param_shapes: list[dict[str, tuple[int, ...]]], world: int
) -> list[TensorSource]:
    out = []
    for s, shapes in enumerate(param_shapes):
        flats = [(a, _records(a)[("optimizer_state_dict", "fp32_flat_groups", s)]) for a in optims]
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = [_range(archive, record, offset, part) for archive, record in flats]
            out.append(TensorSource(location, name, "float32", shape, tuple(pieces)))
            offset += part
    return out
