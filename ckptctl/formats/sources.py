"""Which format a checkpoint is, asked of the format modules in turn, and its tensors as a ``TensorPlan``.

This is the one place that knows the list of formats ``convert/`` can read. Each format module owns its
detection, its completeness rules and its planner; adding a format means one module, its tests, and one line
here. Detection is decided from the listing (one walk) before any file is opened.
"""

from __future__ import annotations

from ckptctl.errors import NotFoundError
from ckptctl.formats.dcp import find_dcp_folder, plan_dcp
from ckptctl.formats.dcp_hf import find_dcp_hf_folder, plan_dcp_hf, refuse_rank_piece
from ckptctl.formats.deepspeed import looks_like_deepspeed, plan_zero
from ckptctl.formats.tensor_layout import TensorPlan, TensorSource
from ckptctl.formats.torch_state import STATE_DICT_FILES, WEIGHT_FILES, open_weights, plan_state_dict
from ckptctl.storage.location import Location


def plan_source(location: Location, *, tag: str | None = None, exclude_frozen: bool = False) -> TensorPlan:
    """The plan for whatever checkpoint ``location`` is: a DCP folder (or a run folder holding one), one torch
    state-dict file (``.pt``/``.bin``/Lightning ``.ckpt``, or a safetensors file), an HF weights folder (single
    or sharded ``pytorch_model*.bin`` / ``model*.safetensors``), else a DeepSpeed ZeRO save (``tag`` picks one
    of its tags)."""
    if location.stat().type == "file":
        refuse_rank_piece(location)
        return _state_dict_plan(location)
    entries = location.walk()
    folder = find_dcp_folder(entries, tag)
    if folder is not None:
        return plan_dcp(location, folder, entries)
    hf_folder = find_dcp_hf_folder(entries, tag)  # before the index beside sharded/ is read unchecked
    if hf_folder is not None:
        return plan_dcp_hf(location, hf_folder, entries)
    from ckptctl.formats.deepspeed_universal import find_universal, plan_universal

    universal = find_universal(location, entries, tag)  # before plan_zero: it has model states too
    if universal is not None:
        return plan_universal(location, universal, entries)
    top = {e.path for e in entries if e.type == "file" and "/" not in e.path}
    if tag is None and not looks_like_deepspeed(entries):
        if top & set(STATE_DICT_FILES):
            return _state_dict_plan(location)
        names = sorted({e.path.split("/", 1)[0] for e in entries})
        found = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "") or "nothing"
        raise NotFoundError(
            f"{location.url} is not a DeepSpeed checkpoint (no *_model_states.pt, no latest), a DCP folder (no "
            f".metadata) or an HF weights folder (no {STATE_DICT_FILES[0]}, {STATE_DICT_FILES[2]}); it holds {found}",
            url=location.url,
        )
    return plan_zero(location, tag=tag, exclude_frozen=exclude_frozen, entries=entries)


def _state_dict_plan(location: Location) -> TensorPlan:
    opened = open_weights(location)
    if opened is None:
        raise NotFoundError(f"no state dict found in {location.url}", url=location.url)
    return plan_state_dict(*opened)


def open_state_dict(location: Location) -> tuple[dict[str, TensorSource], str]:
    """Every tensor of SRC by its name as stored (a file; a folder of HF sharded or single weights; a DeepSpeed
    save or universal checkpoint; a DCP folder or DCP HF-writer save; an HF ``checkpoint-N`` or Accelerate
    ``save_state`` folder holding one), and a description of what was opened. Unlike ``plan_source`` nothing
    is left out or renamed beyond a DCP ``{"model": ...}`` wrapper: extract-lora maps names itself.

    A sharded save is listed once and handed that listing. Named weight files (``model.safetensors``, an
    index...) beside rank files win, as before; a lone other ``.pt``/``.safetensors`` beside a DCP folder does
    not (Lightning's ``meta.pt``), it is only taken when nothing else is here."""
    if location.stat().type == "file":
        refuse_rank_piece(location)  # before open_weights: one rank's piece looks whole
        return _opened(location, open_weights(location))
    entries = location.walk()
    hf_folder = find_dcp_hf_folder(entries, None)
    if hf_folder is not None:  # before open_weights: its index looks like plain HF weights
        return _by_name(plan_dcp_hf(location, hf_folder, entries)), location.url_of(hf_folder)
    top = {e.path for e in entries if e.type == "file" and "/" not in e.path}
    if not top & {*STATE_DICT_FILES, *WEIGHT_FILES}:
        if looks_like_deepspeed(entries):  # a universal folder too (plan_zero hands it on)
            return _by_name(plan_zero(location, entries=entries)), location.url
        folder = find_dcp_folder(entries, None)
        if folder is not None:
            return _by_name(plan_dcp(location, folder, entries)), location.url_of(folder)
    return _opened(location, open_weights(location))


def _by_name(plan: TensorPlan) -> dict[str, TensorSource]:
    return {t.name: t for t in plan.tensors}


def _opened(
    location: Location, opened: tuple[dict[str, TensorSource], str] | None
) -> tuple[dict[str, TensorSource], str]:
    if opened is None:
        raise NotFoundError(
            f"no state dict found in {location.url} (looked for model.safetensors, pytorch_model.bin, a shard "
            "index, a DeepSpeed save, a DCP folder, or a single .safetensors/.pt file)",
            url=location.url,
        )
    return opened
