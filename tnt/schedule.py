"""The learning-rate schedule, one formula for both frameworks (docs/design.md, "Schedule")."""

from __future__ import annotations

import math

import numpy as np


def learning_rate(step: int, peak: float, min_lr: float, warmup: int, horizon: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` to `min_lr` at `horizon`.

    `step` counts optimizer updates from 0: the first update uses `learning_rate(0, ...)`.
    With warmup the first update uses peak/warmup (never 0, so no step is wasted). Past the
    horizon the rate stays at `min_lr`.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(horizon - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def learning_rate_table(peak: float, min_lr: float, warmup: int, horizon: int,
                        steps: int) -> np.ndarray:
    """`learning_rate` for steps 0..steps-1 (JAX indexes it inside the train step), float64:
    JAX keeps it in its default float type, float32 unless float64 is enabled (as in the
    float64 tests, which compare against the exact rate)."""
    return np.array([learning_rate(s, peak, min_lr, warmup, horizon) for s in range(steps)],
                    dtype=np.float64)
