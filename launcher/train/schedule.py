"""Learning-rate schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``.

Step ``k`` (1-based optimizer step) uses ``lr * factor(k - 1)``:

- warmup (``k <= warmup_steps``): ``factor = k / warmup_steps``
- then cosine over the remaining steps: ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2``
"""

from __future__ import annotations

import math
from typing import Any, Dict


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


def scheduler_state(scheduler: Any) -> Dict[str, Any]:
    """The scheduler's JSON-able state, kept in trainer_state.json (its position and its multiplier's settings)."""
    return _jsonable(scheduler.state_dict())


def restore_scheduler(scheduler: Any, saved: Dict[str, Any]) -> None:
    """Restore the scheduler's position from ``scheduler_state``. Its shape (warmup, max_steps, min_lr_ratio) comes
    from this run's config, so raising train.max_steps on resume stretches the cosine from the resumed step on."""
    saved = dict(saved)
    saved["lr_lambdas"] = [dict(vars(f)) if hasattr(f, "__dict__") else None for f in scheduler.lr_lambdas]
    scheduler.load_state_dict(saved)
    step = scheduler.last_epoch
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)  # what LambdaLR computes; unchanged when the schedule is unchanged
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # a tensor
        return value.tolist()
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)
