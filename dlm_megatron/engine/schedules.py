"""Learning-rate schedules as pure functions of the step (so resume is trivially exact)."""
from __future__ import annotations

import math


def lr_at(step: int, *, schedule: str, lr: float, min_lr: float, warmup_steps: int, total_steps: int, decay_fraction: float = 0.2) -> float:
    """LR for optimizer step ``step`` (0-based).

    cosine: linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``total_steps``.
    wsd:    warmup, stable at ``lr``, then linear decay to ``min_lr`` over the last
            ``decay_fraction`` of the run (warmup-stable-decay, as in MiniCPM / LLaDA).
    constant: warmup then flat.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, int(round(total_steps * decay_fraction)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / decay_steps)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown lr schedule {schedule!r}")


def lr_for(train_cfg, step: int) -> float:
    """``lr_at`` with the schedule of a TrainConfig (what every engine sets each step)."""
    t = train_cfg
    return lr_at(step, schedule=t.lr_schedule, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                 total_steps=t.steps, decay_fraction=t.decay_fraction)
