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
from ckptctl.formats.model import Defect, FileFact, Inspection, TensorInfo, nbytes_of
from ckptctl.formats.restricted_pickle import PickledObject, TensorRef
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_zip import read_torch_archive
from ckptctl.storage.location import FileEntry, Location

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
        latest = location.read_bytes("latest").decode("utf-8", "replace").strip()
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
    return {str(k): tuple(v) for k, v in value.items()} if isinstance(value, dict) else {}


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
    dp = int(states.get("dp_world_size") or 1)
    mp = int(states.get("mp_world_size") or 1)
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
    expected = expected_rank_files(stage, dp, mp, bf16_prefix)
    missing = [n for n in expected if n not in tag.files]
    defects = [Defect(rel(n), "rank file missing") for n in missing]
    defects += [
        Defect(rel(n), "empty rank file") for n in expected if n in tag.files and tag.files[n].size == 0
    ]
    verified_stage = None
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
    if verified_stage is not None and stage is not None and verified_stage != stage:
        defects.append(
            Defect(rel(first), f"ds_config says stage {stage}, optimizer files say {verified_stage}")
        )

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
