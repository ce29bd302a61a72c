"""DeepSpeed universal checkpoints: what ``ds_to_universal`` writes from a ZeRO save.

``<save_dir>/latest_universal`` names the folder (``<tag>_universal`` by convention) that holds
``zero/<param>/fp32.pt`` — one torch.save per parameter, ``{"param": <the full fp32 tensor>, "cat_dim": ...}``,
beside ``exp_avg.pt``, ``exp_avg_sq.pt`` and ``step.pt`` — ``zero/optimizer_state.pt`` and the ZeRO save's
``*model_states.pt`` files, copied as they were (deepspeed 0.19.8 ``checkpoint/ds_to_universal.py``). Its
phase-1 fragments go to ``<folder>/tmp``, removed only when the run succeeds: a ``tmp/`` still there means the
conversion did not finish, and the folder is refused.

The model is read as DeepSpeed's universal loader restores it: buffers and frozen parameters from rank 0's model
states (``ds_to_universal`` also writes ``fp32.pt`` for them, cast with ``.float()``, which turns an int64 buffer
into float32, so those copies are not used), trainable parameters from ``fp32.pt`` in ``param_shapes`` order,
tied aliases from ``shared_params``: the order and dtypes of ``zero_to_fp32`` on the original save.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from ckptctl.errors import IntegrityError, NotFoundError
from ckptctl.formats.deepspeed import (
    MODEL_STATES,
    _archive,
    _natural,
    _range,
    _records,
    _shape,
    model_state_tensors,
    refuse_tensor_parallel,
    world_sizes,
)
from ckptctl.formats.tensor_layout import TensorPlan, TensorSource
from ckptctl.storage.location import POINTER_FILE_LIMIT, FileEntry, Location

POINTER = "latest_universal"
PARAMS_DIR = "zero"
MASTER_FILE = "fp32.pt"
TEMP_DIR = "tmp"


def is_universal_folder(rels: set[str]) -> bool:
    """Relative file paths of one folder: model states beside ``zero/<param>/fp32.pt``."""
    return any(MODEL_STATES.match(r) for r in rels) and any(
        r.startswith(f"{PARAMS_DIR}/") and r.endswith(f"/{MASTER_FILE}") for r in rels
    )


def find_universal(location: Location, entries: Sequence[FileEntry], tag: str | None = None) -> str | None:
    """The universal folder to read (relative to ``location``, "" for the location itself): ``tag`` when it is
    one, the location when it is one, else the folder ``latest_universal`` names when there is no ``latest``
    (a ZeRO save's own pointer wins: DeepSpeed loads universal checkpoints only when asked to). None when this
    is no universal checkpoint. IntegrityError when ``latest_universal`` names a folder that is not there."""
    files = [e.path for e in entries if e.type == "file"]

    def inside(folder: str) -> set[str]:
        lead = f"{folder}/" if folder else ""
        return {p[len(lead) :] for p in files if p.startswith(lead)}

    if tag is not None:
        return tag if is_universal_folder(inside(tag)) else None
    if is_universal_folder(inside("")):
        return ""
    if POINTER not in files or "latest" in files:
        return None
    named = location.read_bytes(POINTER, max_bytes=POINTER_FILE_LIMIT).decode("utf-8", "replace").strip()
    # ds_to_universal writes the output folder's base name; accept a path below the save dir too.
    named = named.strip("/")
    if not named or not is_universal_folder(inside(named)):
        raise IntegrityError(
            f"{location.url_of(POINTER)} names {named!r}, which holds no universal checkpoint "
            f"({PARAMS_DIR}/<param>/{MASTER_FILE} and model states)",
            url=location.url_of(POINTER),
        )
    return named


def plan_universal(location: Location, folder: str, listing: Sequence[FileEntry] | None = None) -> TensorPlan:
    """Every tensor's bytes in a universal folder, from rank 0's model states and one ``fp32.pt`` header per
    trainable parameter (two ranged reads each; no tensor data). A trainable parameter without its
    ``fp32.pt`` is an IntegrityError naming it, before anything is written. ``listing``: the location's
    listing when the caller has one (else one walk)."""
    prefix = f"{folder}/" if folder else ""
    walked = location.walk() if listing is None else listing
    entries = [e for e in walked if e.type == "file" and e.path.startswith(prefix)]
    sizes = {e.path: e.size for e in entries}
    rels = {e.path[len(prefix) :] for e in entries}
    if any(r.startswith(f"{TEMP_DIR}/") for r in rels):
        raise IntegrityError(
            f"{location.url_of(prefix + TEMP_DIR)} is still there: ds_to_universal removes it when it finishes, "
            "so this conversion did not complete",
            url=location.url_of(prefix + TEMP_DIR),
            hint="re-run ds_to_universal (or convert the original ZeRO tag)",
        )
    here = sorted((r for r in rels if "/" not in r), key=_natural)
    models = [n for n in here if MODEL_STATES.match(n)]
    if not models:
        raise NotFoundError(
            f"{location.url_of(folder)}: no *_model_states.pt beside {PARAMS_DIR}/", url=location.url
        )
    model0 = _archive(location, prefix + models[0], sizes)
    state = model0.obj if isinstance(model0.obj, dict) else {}
    stage3 = any(MODEL_STATES.match(n).group("dp") is not None for n in models)  # type: ignore[union-attr]
    # Only the model states are copied: at stage 3 one per dp rank, at stage 1/2 one per mp rank.
    dp, mp, implausible = world_sizes(state, 3 if stage3 else None, len(models))
    if implausible is not None:
        raise IntegrityError(f"{location.url_of(prefix + models[0])}: {implausible}", url=location.url)
    refuse_tensor_parallel(location, folder, mp)
    param_shapes = [{str(k): _shape(v) for k, v in g.items()} for g in state.get("param_shapes") or []]
    trainable = [(name, shape) for group in param_shapes for name, shape in group.items()]
    masters = {name: f"{prefix}{PARAMS_DIR}/{name}/{MASTER_FILE}" for name, _ in trainable}
    missing = [name for name, rel in masters.items() if rel not in sizes]
    if missing:
        listed = ", ".join(f"{PARAMS_DIR}/{n}/{MASTER_FILE}" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise IntegrityError(
            f"{location.url_of(folder)}: {len(missing)} parameter folder(s) missing: {listed}{more}",
            url=location.url,
        )
    config = state.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero["stage"] if isinstance(zero, dict) and isinstance(zero.get("stage"), int) else None
    plan = TensorPlan(
        folder or posixpath.basename(location.root.rstrip("/")),
        "universal",
        [],
        stage=stage,
        world_size=dp,
        default_dtype="float32",
    )
    plan.tensors += model_state_tensors(
        location, prefix, here, sizes, model0, dp, stage3, exclude_frozen=False, warnings=plan.warnings
    )
    for name, shape in trainable:
        archive = _archive(location, masters[name], sizes)
        record = _records(archive).get(("param",))
        if record is None or record.shape != shape:
            found = "no param tensor" if record is None else f"shape {list(record.shape)}"
            raise IntegrityError(
                f"{location.url_of(masters[name])}: {found}, the model states say {list(shape)}",
                url=location.url_of(masters[name]),
            )
        plan.tensors.append(
            TensorSource(location, name, record.dtype, shape, (_range(archive, record, 0, record.numel),))
        )
    plan.aliases = {str(k): str(v) for k, v in (state.get("shared_params") or {}).items()}
    return plan
