"""Learning rate per optimizer step: linear warm-up, then cosine (or constant) decay to zero.

A pure function of the step, so a resumed run (even a weights-only resume at another world size)
gets exactly the learning rate the uninterrupted run would have had.
"""
from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_at"]

SCHEDULES = ("cosine", "constant", "linear")


def lr_at(step: int, total_steps: int, base_lr: float, warmup_ratio: float = 0.03, schedule: str = "cosine") -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`; warm-up is ceil(warmup_ratio * total) steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps: must be >= 1, got {total_steps}")
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
