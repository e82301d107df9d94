"""Learning-rate schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``.

Step ``k`` (1-based optimizer step) uses ``lr * factor(k - 1)``:

- warmup (``k <= warmup_steps``): ``factor = k / warmup_steps``
- then cosine over the remaining steps: ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2``
"""

from __future__ import annotations

import math
from typing import Any


class WarmupCosine:
    """Picklable (and JSON-able) multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    A class rather than a closure: LambdaLR stores a callable object's ``__dict__`` in its state dict, so the schedule
    travels with the checkpoint.
    """

    def __init__(self, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> None:
        if max_steps < 1:
            raise ValueError(f"train.max_steps must be at least 1, got {max_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = max(0, int(warmup_steps))
        self.max_steps = int(max_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, index: int) -> float:
        if index < self.warmup_steps:
            return (index + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - self.warmup_steps - 1)
        progress = min(1.0, (index - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: Any, train: Any) -> Any:
    """LambdaLR over ``optimizer`` from the ``train`` config section (lr, warmup_steps, max_steps, min_lr_ratio)."""
    from torch.optim.lr_scheduler import LambdaLR

    factor = WarmupCosine(warmup_steps=train.warmup_steps, max_steps=train.max_steps, min_lr_ratio=train.min_lr_ratio)
    return LambdaLR(optimizer, factor)
