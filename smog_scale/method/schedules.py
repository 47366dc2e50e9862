"""Schedules as pure functions of ``global_step`` (docs/method.md "Schedules").

``total_steps`` is the full-length run; stopping early (``run.max_steps``) keeps this shape.
"""

from __future__ import annotations

import math


def _progress(step: int, total_steps: int) -> float:
    return min(max(step / max(total_steps, 1), 0.0), 1.0)


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (constant after)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, total_steps)))


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int, final: float = 0.0) -> float:
    """Per-step linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def ema_momentum(step: int, total_steps: int, start: float = 0.99, end: float = 1.0) -> float:
    """Momentum m of the momentum encoder: cosine from ``start`` (0.99) to 1.0 (BYOL)."""
    return cosine(step, total_steps, start, end)


def group_beta(step: int, total_steps: int, start: float = 1.0, end: float = 0.99, schedule: str = "linear") -> float:
    """beta of the group momentum update: ``linear`` from ``start`` (1.0) to ``end`` (0.99), or ``fixed`` at
    ``end`` (paper ablation 7a)."""
    if schedule == "fixed":
        return end
    if schedule != "linear":
        raise ValueError(f"beta schedule must be 'linear' or 'fixed', got {schedule!r}")
    return start + (end - start) * _progress(step, total_steps)
