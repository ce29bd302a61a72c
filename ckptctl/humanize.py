"""Parsing and printing of sizes, durations and ages, shared by every command."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from ckptctl.errors import UsageError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# No store holds more than this; a longer number is a typo, not a size (and would overflow float()).
_MAX_SIZE = 10**21


def parse_size(text: str) -> int:
    """``500MB``, ``2GiB``, ``1.5T``, ``1024`` -> bytes."""
    found = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else None
    if not found or unit not in _SIZE_UNITS:
        raise UsageError(f"not a size: {text[:40]!r} (examples: 500MB, 2GiB, 1T)")
    size = int(Fraction(found.group(1)) * _SIZE_UNITS[unit])
    if size > _MAX_SIZE:
        raise UsageError(f"not a plausible size: {text[:40]!r} is more than 1 ZB")
    return size


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``1h30m``, ``7d``, ``600`` (seconds) -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d{1,15}(?:\.\d{1,15})?", text):
        return float(text)
    parts = re.findall(r"(\d{1,15}(?:\.\d{1,15})?)([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"not a duration: {text[:40]!r} (examples: 90s, 10m, 1h30m, 7d)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_steps(text: str, *, allow_empty: bool = True) -> list[int]:
    """``100,200, 300`` -> [100, 200, 300]: the one parser of step lists (``--keep-steps``, ``--steps``)."""
    steps = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not re.fullmatch(r"\d{1,18}", part):
            raise UsageError(f"not a step: {part[:40]!r} (a step is a whole number, e.g. 100,200,300)")
        steps.append(int(part))
    if not steps and not allow_empty:
        raise UsageError(f"no step in {text[:40]!r} (give step numbers separated by commas, e.g. 800,900)")
    return steps


def format_bytes(size: int | float) -> str:
    """Binary units, three significant digits: ``1.46 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} PiB"  # pragma: no cover


def format_age(seconds: float | None) -> str:
    """``45s``, ``12m``, ``3h``, ``5d`` (``-`` when unknown)."""
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = max(seconds, 0)
    for limit, unit, div in ((120, "s", 1), (7200, "m", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // div)}{unit}"
    return f"{int(seconds // 86400)}d"
