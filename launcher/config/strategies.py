"""THE strategy table: each parallelism strategy's engine, what it shards, its DeepSpeed stage and whether its
checkpoints reshard on resume. Stdlib only: the login node (validation, the memory planner) and the job (the engines
in ``launcher.train.strategies``, checkpoints) read the same rows.

Ordered by communication volume per step, least first: the order in which the planner recommends them. zero3 and
fsdp shard the same states; zero3 comes first so that moving up from zero1/zero2 keeps the same engine and checkpoint
format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class StrategySpec:
    name: str
    engine: str  # "ddp" | "deepspeed" | "fsdp2"
    shards: int  # 0 nothing, 1 optimizer state, 2 + gradients, 3 + parameters
    zero_stage: Optional[int]  # the DeepSpeed ZeRO stage; None outside DeepSpeed
    # How a checkpoint loads on another world size: DCP reshards itself; ZeRO partitions go through DeepSpeed's
    # universal checkpoint (converted on resume, launcher.train.strategies.universal).
    reshards_through: str
    backend: Tuple[str, str]  # (module, class) of the engine in launcher.train.strategies

    @property
    def can_offload_optimizer(self) -> bool:
        return self.shards >= 1

    @property
    def can_offload_params(self) -> bool:
        return self.shards >= 3


_TRAIN = "launcher.train.strategies"
_UNIVERSAL = "DeepSpeed's universal checkpoint"
STRATEGIES: Dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec("ddp", "ddp", 0, None, "DCP", (f"{_TRAIN}.ddp", "DDPStrategy")),
        StrategySpec("zero1", "deepspeed", 1, 1, _UNIVERSAL, (f"{_TRAIN}.deepspeed", "DeepSpeedStrategy")),
        StrategySpec("zero2", "deepspeed", 2, 2, _UNIVERSAL, (f"{_TRAIN}.deepspeed", "DeepSpeedStrategy")),
        StrategySpec("zero3", "deepspeed", 3, 3, _UNIVERSAL, (f"{_TRAIN}.deepspeed", "DeepSpeedStrategy")),
        StrategySpec("fsdp", "fsdp2", 3, None, "DCP", (f"{_TRAIN}.fsdp", "FSDPStrategy")),
    )
}
STRATEGY_NAMES: Tuple[str, ...] = tuple(STRATEGIES)


def needs_cpu_collectives(strategy_cfg: Any, device_type: str) -> bool:
    """FSDP2 with CPU offload on GPUs: gradients live on the host and their norm is reduced there, so the process
    group needs gloo for CPU tensors beside NCCL (decided before any torch import)."""
    offload = bool(strategy_cfg.offload_params or strategy_cfg.offload_optimizer)
    spec = STRATEGIES.get(strategy_cfg.name)
    return spec is not None and spec.engine == "fsdp2" and offload and device_type == "cuda"


def strategy_spec(name: str) -> StrategySpec:
    """The row of ``name``; ValueError naming the allowed ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGY_NAMES)}") from None
