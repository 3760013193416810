"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(done: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for the optimizer step that follows ``done`` completed steps.

    Warmup ramps (done+1)/warmup so the first step already moves (lr/warmup, not 0); the cosine then runs
    from 1 at step ``warmup`` to ``min_ratio`` at the last step (``total - 1`` completed).
    """
    if done < warmup:
        return (done + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (done - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, min_ratio: float) -> LambdaLR:
    """A ``LambdaLR`` stepped once per applied optimizer step (DeepSpeed steps it inside ``engine.step``)."""
    return LambdaLR(optimizer, partial(lr_multiplier, warmup=warmup, total=total, min_ratio=min_ratio))
