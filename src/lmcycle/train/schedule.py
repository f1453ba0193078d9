"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

The schedule is a pure function of the optimizer step, so it has no state of its own to checkpoint: resuming at
step ``k`` gives the same learning rate as an uninterrupted run at step ``k``.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Warmup rises linearly over ``warmup_steps`` steps to ``lr`` (step 0 already gets ``lr / warmup_steps``, so
    no step is wasted at zero). After warmup, a half cosine goes from ``lr`` down to ``min_lr_ratio * lr``, which
    the last step (``max_steps - 1``) reaches exactly.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = lr * min_lr_ratio
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
