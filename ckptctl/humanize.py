"""Parsing and printing of sizes, durations and ages, shared by every command."""

from __future__ import annotations

import math
import re

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


def parse_size(text: str) -> int:
    """``500MB``, ``2GiB``, ``1.5T``, ``1024`` -> bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else None
    if not found or unit not in _SIZE_UNITS:
        raise UsageError(f"not a size: {text!r} (examples: 500MB, 2GiB, 1T)")
    return int(float(found.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``1h30m``, ``7d``, ``600`` (seconds) -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"not a duration: {text!r} (examples: 90s, 10m, 1h30m, 7d)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


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
