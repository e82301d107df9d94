"""Login-node planning: device facts and per-device memory estimates. Stdlib only (no torch)."""

from launcher.plan.devices import DEVICES, Device, get_device
from launcher.plan.memory import (
    STRATEGIES,
    MemoryEstimate,
    ModelShape,
    StrategyFit,
    activation_bytes,
    estimate_for_model,
    estimate_memory,
    format_strategy_table,
    gib,
    plan_strategies,
    recommend,
)

__all__ = [
    "DEVICES",
    "STRATEGIES",
    "Device",
    "MemoryEstimate",
    "ModelShape",
    "StrategyFit",
    "activation_bytes",
    "estimate_for_model",
    "estimate_memory",
    "format_strategy_table",
    "get_device",
    "gib",
    "plan_strategies",
    "recommend",
]
