"""Checkpoint-interval models: pure arithmetic on seconds, no I/O.

Symbols as in the literature: δ (``save_cost``) is the time one save blocks training, M (``mtbf``) the job's
mean time between failures, R (``restart_cost``) the time a restart takes before training resumes, T
(``interval``) the compute time between two saves. Sources: Young, "A first order approximation to the optimum
checkpoint interval", CACM 17(9), 1974; Daly, "A higher order estimate of the optimum checkpoint interval for
restart dumps", FGCS 22(3), 2006, doi:10.1016/j.future.2004.11.016; Meta's Llama 3 paper (2024) for the failure
rate per GPU.
"""

from __future__ import annotations

import math

# Llama 3 405B pre-training: 419 unexpected interruptions in 54 days on 16,384 H100 GPUs (Meta, "The Llama 3
# Herd of Models", 2024, as reported by datacenterdynamics.com). Assuming failures scale with the GPU count,
# one GPU fails once in this many seconds (≈ 50,700 GPU-hours).
LLAMA3_GPUS = 16_384
LLAMA3_DAYS = 54
LLAMA3_UNEXPECTED_INTERRUPTIONS = 419
GPU_SECONDS_PER_FAILURE = LLAMA3_DAYS * 86_400 * LLAMA3_GPUS / LLAMA3_UNEXPECTED_INTERRUPTIONS
GPU_RATE_SOURCE = (
    f"Llama 3 405B's rate: {LLAMA3_UNEXPECTED_INTERRUPTIONS} unexpected interruptions in {LLAMA3_DAYS} days on "
    f"{LLAMA3_GPUS:,} GPUs (one per {GPU_SECONDS_PER_FAILURE / 3600:,.0f} GPU-hours)"
)

DEFAULT_MAX_OVERHEAD = 0.05
"""CheckFreq's default overhead budget (``max_overhead`` = 5 %, FAST'21)."""


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def young_interval(save_cost: float, mtbf: float) -> float:
    """Young (1974): T = √(2δM), the first-order optimum; it minimises :func:`expected_loss`."""
    _require_positive(save_cost=save_cost, mtbf=mtbf)
    return math.sqrt(2 * save_cost * mtbf)


def daly_interval(save_cost: float, mtbf: float) -> float:
    """Daly (2006), the higher-order optimum: √(2δM)·[1 + ⅓·√(δ/2M) + (1/9)·(δ/2M)] − δ for δ < 2M, else M.

    About ⅔·δ below Young when δ ≪ M; the restart cost changes the run's total time, not this interval.
    """
    _require_positive(save_cost=save_cost, mtbf=mtbf)
    if save_cost >= 2 * mtbf:
        return mtbf
    ratio = save_cost / (2 * mtbf)
    return math.sqrt(2 * save_cost * mtbf) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - save_cost


def expected_loss(interval: float, save_cost: float, mtbf: float, restart_cost: float = 0.0) -> float:
    """The first-order fraction of wall time lost at ``interval``: δ/T for saving, plus (T/2 + R)/M for the
    half interval of work each failure re-does and its restart. Valid while δ, T and R are small against M;
    capped at 1 (beyond that the job makes no progress)."""
    _require_positive(interval=interval, save_cost=save_cost, mtbf=mtbf)
    if restart_cost < 0:
        raise ValueError(f"restart_cost must not be negative, got {restart_cost!r}")
    return min(1.0, save_cost / interval + (interval / 2 + restart_cost) / mtbf)


def overhead_floor(save_cost: float, max_overhead: float) -> float:
    """The shortest interval whose saving stays within ``max_overhead`` of the time (δ/T ≤ q, so T = δ/q):
    CheckFreq's and PCcheck's budget rule, which needs no failure rate."""
    _require_positive(save_cost=save_cost)
    if not 0 < max_overhead < 1:
        raise ValueError(f"max_overhead must be a fraction between 0 and 1, got {max_overhead!r}")
    return save_cost / max_overhead


def mtbf_for_gpus(gpus: int) -> float:
    """A job's mean time between failures on ``gpus`` GPUs at Llama 3's per-GPU failure rate (seconds)."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus!r}")
    return GPU_SECONDS_PER_FAILURE / gpus


def interval_in_steps(interval: float, step_time: float) -> int:
    """An interval in whole training steps (at least one), for a trainer's ``save_steps``-style setting."""
    _require_positive(interval=interval, step_time=step_time)
    return max(1, round(interval / step_time))
