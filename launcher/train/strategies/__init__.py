"""Parallelism backends behind one interface (``base.Strategy``): ddp, zero1/zero2/zero3 (DeepSpeed), fsdp (FSDP2).

The registry: each strategy's row in ``launcher.config.strategies`` names its engine module and class. A module is
imported only when its strategy is chosen, so a missing DeepSpeed breaks only the zero* strategies, and says so before
any model is built. Per-engine module functions, found through the spec:

    check_available()              (optional) raise StrategyUnavailable when the installed packages cannot run it
    checkpoint_problem(directory)  why a checkpoint directory cannot be loaded by this engine, or None
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Optional, Type

from launcher.config.strategies import StrategySpec, strategy_spec
from launcher.train.distributed import DistEnv
from launcher.train.strategies.base import Strategy, StrategyUnavailable

if TYPE_CHECKING:
    from launcher.config.schema import StrategyConfig, TrainConfig

__all__ = ["Strategy", "StrategyUnavailable", "checkpoint_problem", "create", "strategy_class"]


def _engine_module(spec: StrategySpec) -> ModuleType:
    try:
        return importlib.import_module(spec.backend[0])
    except ImportError as e:  # e.g. deepspeed missing
        raise StrategyUnavailable(f"strategy={spec.name} cannot be imported: {e}") from e


def strategy_class(name: str) -> Type[Strategy]:
    """The class of strategy ``name``, after checking that the installed packages can run it."""
    spec = strategy_spec(name)
    module = _engine_module(spec)
    check = getattr(module, "check_available", None)
    if check is not None:
        check()
    return getattr(module, spec.backend[1])


def checkpoint_problem(spec: StrategySpec) -> Callable[[Path], Optional[str]]:
    """The engine's check of a checkpoint directory (for ``CheckpointManager``)."""
    return _engine_module(spec).checkpoint_problem


def create(strategy_cfg: "StrategyConfig", train: "TrainConfig", env: DistEnv) -> Strategy:
    """The strategy named by ``strategy_cfg.name``; fails early when the installed packages cannot run it."""
    return strategy_class(strategy_cfg.name)(strategy_cfg, train, env)
