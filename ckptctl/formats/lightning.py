"""Lightning ``.ckpt`` files: the step, the epoch and what ``ModelCheckpoint`` knew when it wrote the file.

A ``.ckpt`` is one torch.save file (zip, or legacy from old versions) of ``{"epoch", "global_step",
"pytorch-lightning_version", "state_dict", "loops", "callbacks", "optimizer_states", "lr_schedulers", …}``
(notes/retention-and-layouts.md §7.2). ``callbacks["ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', …}"]``
holds ``monitor``, ``current_score`` (the monitored value of this very save, set just before each top-k save),
``best_k_models`` ({absolute path on the writing host: score}), ``best_model_path``, ``last_model_path``; the
scores are 0-d tensors, the mode is only in the key. So a file carries its own metric even when its name
(Lightning's default ``{epoch}-{step}.ckpt``) has none.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from ckptctl.errors import IntegrityError
from ckptctl.formats.restricted_pickle import TensorRef
from ckptctl.formats.source import FileSource
from ckptctl.formats.torch_file import TorchFile, read_scalars, read_torch_file

_MODE = re.compile(r"""['"]mode['"]\s*:\s*['"](min|max)['"]""")


@dataclass(frozen=True)
class LightningMeta:
    global_step: int | None
    epoch: int | None
    monitor: str | None
    mode: str | None
    """``min`` or ``max``, from the callback's state key; None when the file does not say."""
    current_score: float | None
    best_k_models: dict[str, float] = field(default_factory=dict)
    """Basename of each top-k file (as of this save, itself included) -> its score."""
    best_model_path: str | None = None
    last_model_path: str | None = None


def _int(value: Any) -> int | None:
    return value if type(value) is int and -(2**63) <= value < 2**63 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def checkpoint_callback(obj: Any) -> tuple[str, dict[str, Any]] | None:
    """The ``ModelCheckpoint`` state (key, state) of a Lightning checkpoint object: the first callback state
    with ``best_k_models`` and a monitor, else the first with ``best_k_models`` (a callback that monitors
    nothing); recognised by its keys, so subclasses count."""
    callbacks = obj.get("callbacks") if isinstance(obj, dict) else None
    if not isinstance(callbacks, dict):
        return None
    states = [(str(k), v) for k, v in callbacks.items() if isinstance(v, dict) and "best_k_models" in v]
    monitored = [(k, v) for k, v in states if isinstance(v.get("monitor"), str)]
    chosen = (monitored or states)[:1]
    return chosen[0] if chosen else None


def lightning_meta(obj: Any, file: TorchFile) -> LightningMeta:
    """``LightningMeta`` from an unpickled checkpoint object; its scores are read from ``file`` (one request for
    all of them, usually)."""
    top = obj if isinstance(obj, dict) else {}
    found = checkpoint_callback(obj)
    if found is None:
        return LightningMeta(_int(top.get("global_step")), _int(top.get("epoch")), None, None, None)
    key, state = found
    best = state.get("best_k_models")
    best_items = list(best.items()) if isinstance(best, dict) else []
    current = state.get("current_score")
    refs = [v for v in (current, *(v for _, v in best_items)) if isinstance(v, TensorRef)]
    values = dict(zip(map(id, refs), read_scalars(file, refs), strict=True)) if refs else {}

    def score(value: Any) -> float | None:
        return _number(values.get(id(value)) if isinstance(value, TensorRef) else value)

    mode = _MODE.search(key[:4096])
    best_k = {}
    for path, value in best_items:
        number = score(value)
        if isinstance(path, str) and number is not None:
            best_k[posixpath.basename(path.replace("\\", "/"))] = number
    return LightningMeta(
        global_step=_int(top.get("global_step")),
        epoch=_int(top.get("epoch")),
        monitor=_text(state.get("monitor")),
        mode=mode.group(1) if mode else None,
        current_score=score(current),
        best_k_models=best_k,
        best_model_path=_text(state.get("best_model_path")),
        last_model_path=_text(state.get("last_model_path")),
    )


def read_lightning_meta(source: FileSource) -> LightningMeta:
    """Step, epoch and ``ModelCheckpoint`` state of a Lightning ``.ckpt`` (zip or legacy torch file).

    Cost over an object store, zip: one read of the tail (the directory), one of ``data.pkl`` (at the start;
    one read serves both for a file under 128 KiB), and one for the score tensors (more only when they lie over
    64 KiB apart; Lightning pickles its callbacks after the weights, so they often lie in the tail already).
    Legacy: one read of the start (more for a pickle over 64 KiB) and one per score tensor in the worst case (the
    format orders storages by memory address, which scatters them through the data).

    The pickle is read with ``foreign="inert"``: user hyperparameters may hold any class, and only the plain
    values above are taken from it, never a foreign object. IntegrityError when the file is not a whole torch
    file.
    """
    file = read_torch_file(source, foreign="inert")
    try:
        return lightning_meta(file.obj, file)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise IntegrityError(
            f"{source.name}: malformed Lightning checkpoint ({type(exc).__name__})",
            url=source.location.url_of(source.rel),
        ) from None
