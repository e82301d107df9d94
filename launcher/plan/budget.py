"""Node-hour budget of a full training run: walltime, node-hours and billing units for a token target."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.schema import LauncherConfig

from launcher.plan.billing import UNIT_NAMES, billing_units
from launcher.plan.job import JobPlan
from launcher.plan.fit import planned_shape
from launcher.plan import get_device
from launcher.plan.flops import flops_for_shape


@dataclass(frozen=True)
class Budget:
    tokens: float
    tokens_per_s_per_device: float
    source: str  # "measured" or "assumed MFU 35%"
    walltime_h: float
    node_hours: float
    billing: float
    billing_unit: str

    def describe(self) -> str:
        return (f"{self.tokens:.3g} tokens at {self.tokens_per_s_per_device:,.0f} tokens/s per device ({self.source}): "
                f"{self.walltime_h:,.1f} h walltime, {self.node_hours:,.0f} node-hours, "
                f"{self.billing:,.0f} {UNIT_NAMES[self.billing_unit]}")


def estimate_budget(cfg: LauncherConfig, plan: JobPlan) -> Budget | None:
    budget = cfg.budget
    if not budget.tokens:
        return None
    if budget.tokens_per_s_per_device:
        per_device, source = budget.tokens_per_s_per_device, "measured"
    else:
        shape = planned_shape(cfg)
        peft = cfg.peft
        trainable = (shape.lora_params(peft.r, target_modules=tuple(peft.target_modules))
                     if peft.name in ("lora", "qlora") else None)
        peak = get_device(cfg.cluster.device).peak_bf16_tflops * 1e12
        per_device = budget.mfu * peak / flops_for_shape(shape, cfg.train.seq_len, trainable)
        source = f"assumed MFU {budget.mfu:.0%}"
    devices = plan.world_size
    walltime_s = budget.tokens / (per_device * devices)
    return Budget(
        tokens=budget.tokens, tokens_per_s_per_device=per_device, source=source, walltime_h=walltime_s / 3600,
        node_hours=plan.nodes * walltime_s / 3600,
        billing=billing_units(cfg.cluster, plan.nodes, int(walltime_s)), billing_unit=plan.billing_unit,
    )
