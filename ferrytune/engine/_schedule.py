"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay to 0."""

from __future__ import annotations

import math


def lr_at(step: int, train_cfg) -> float:
    """The learning rate of 0-based ``step`` under ``train.lr``/``lr_schedule``/``warmup_steps``."""
    base, warm, total = train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps
    if warm and step < warm:
        return base * (step + 1) / warm
    if train_cfg.lr_schedule == "constant":
        return base
    frac = (step - warm) / max(total - warm, 1)
    if train_cfg.lr_schedule == "linear":
        return base * max(0.0, 1.0 - frac)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
