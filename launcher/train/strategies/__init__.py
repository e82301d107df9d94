"""Parallelism backends behind one interface (``base.Strategy``): ddp, zero1/zero2/zero3 (DeepSpeed), fsdp (FSDP2).

Each backend lives in its own module and is imported only when chosen, so a missing DeepSpeed breaks only the zero*
strategies, and says so before any model is built.
"""

from __future__ import annotations

import importlib
from typing import Any, Type

from launcher.config.strategies import strategy_spec
from launcher.train.strategies.base import Strategy, StrategyUnavailable


__all__ = ["Strategy", "StrategyUnavailable", "strategy_class", "create"]


def strategy_class(name: str) -> Type[Strategy]:
    module_name, class_name = strategy_spec(name).backend
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # e.g. deepspeed missing
        raise StrategyUnavailable(f"strategy={name} cannot be imported: {e}") from e
    cls = getattr(module, class_name)
    cls.check_available()
    return cls


def create(cfg: Any, env: Any) -> Strategy:
    """The strategy named by ``cfg.strategy.name``; fails early when the installed packages cannot run it."""
    return strategy_class(cfg.strategy.name)(cfg, env)
