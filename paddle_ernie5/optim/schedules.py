"""Learning-rate schedules as pure functions of the step (nothing to checkpoint but the step)."""

from __future__ import annotations

import math

from ..config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based). Linear warmup, then:
    wsd: constant until the last `decay_fraction` of steps, then linear decay to min_lr;
    cosine: cosine decay from lr to min_lr over the remaining steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = int(round(cfg.decay_fraction * cfg.max_steps))
        decay_start = cfg.max_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return cfg.lr
        frac = min(1.0, (step - decay_start + 1) / decay_steps)
        return cfg.lr + (cfg.min_lr - cfg.lr) * frac
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps + 1) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
