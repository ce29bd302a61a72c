"""Metrics attached to units by exact step: HF ``trainer_state.json`` and ``name=value`` in unit names."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

# name=value inside a file or folder name (Lightning ``epoch=2-step=12-val_loss=1.0477.ckpt``, NeMo
# ``model--val_loss=0.53-step=100-consumed_samples=800``). Step and epoch are identity, not metrics.
_NAME_METRIC = re.compile(
    r"(?:^|[-_/]|--)(?P<name>[A-Za-z][A-Za-z0-9_.]*?)=(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf)"
    r"(?=$|[-_/]|\.ckpt$|\.pt$|\.safetensors$|\.nemo$|-v\d+)",
    re.IGNORECASE,
)
_IDENTITY_KEYS = {"epoch", "step", "global_step"}


def metrics_from_name(name: str) -> dict[str, float]:
    """``name=value`` pairs embedded in a unit's name, without step/epoch."""
    found: dict[str, float] = {}
    for match in _NAME_METRIC.finditer(name):
        key = match.group("name")
        if key.lower() in _IDENTITY_KEYS:
            continue
        try:
            found[key] = float(match.group("value"))
        except ValueError:
            continue
    return found


@dataclass(frozen=True)
class TrainerState:
    """What ckptctl uses from an HF ``trainer_state.json``."""

    by_step: dict[int, dict[str, float]]
    best_model_checkpoint: str | None
    global_step: int | None


class TrainerStateError(ValueError):
    """A ``trainer_state.json`` ckptctl cannot use; ``truncated`` when the JSON itself is cut short or empty
    (HF writes the file last with a plain ``json.dump``, so a cut file is an interrupted save)."""

    def __init__(self, message: str, *, truncated: bool) -> None:
        super().__init__(message)
        self.truncated = truncated


def parse_trainer_state(data: bytes) -> TrainerState:
    """Parse ``trainer_state.json``: numeric ``log_history`` values grouped by their exact ``step``.

    Raises TrainerStateError: ``truncated`` for JSON that does not parse (cut short, as an interrupted save
    leaves it), not for JSON of another shape (a ``log_history`` that is not a list, nesting too deep to
    parse), which says nothing about whether the save finished.
    """
    try:
        state = json.loads(data)
    except RecursionError:
        raise TrainerStateError("nested too deeply to be a trainer_state.json", truncated=False) from None
    except json.JSONDecodeError as exc:
        raise TrainerStateError(f"truncated or corrupt JSON ({exc})", truncated=True) from None
    except ValueError as exc:
        raise TrainerStateError(f"not UTF-8 JSON ({exc})", truncated=False) from None
    if not isinstance(state, dict):
        raise TrainerStateError("not a JSON object", truncated=False)
    history = state.get("log_history") or []
    if not isinstance(history, list):
        raise TrainerStateError("log_history is not a list", truncated=False)
    by_step: dict[int, dict[str, float]] = {}
    for entry in history:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        values = by_step.setdefault(entry["step"], {})
        for key, value in entry.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            number = float(value) if not isinstance(value, int) or abs(value) < 2**63 else math.inf
            values[str(key)] = number
    best = state.get("best_model_checkpoint")
    step = state.get("global_step")
    return TrainerState(
        by_step=by_step,
        best_model_checkpoint=best if isinstance(best, str) else None,
        global_step=step if isinstance(step, int) else None,
    )


def format_metric(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"
