"""Learning-rate schedule as a pure function of the step (restarted per phase, as in the paper)."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, *, lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over warmup_steps, then cosine to min_lr at total_steps.

    `step` counts optimizer steps from 0 within the schedule. The paper resets the schedule at the switch
    (2000 warmup steps, cosine to 0, in both phases), so the trainer calls this with per-phase steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
