"""The memory plan shown by every dry run, and the check that stops a submission that would run out of memory."""

from __future__ import annotations

from typing import List, Tuple

from launcher.config.schema import LauncherConfig, ModelConfig

from launcher.errors import ConfigError
from launcher.plan import ModelShape, StrategyFit, format_strategy_table, get_device, plan_strategies
from launcher.plan.devices import Device


def planner_assumes_flash(device_name: str | None) -> bool:
    """THE memory plan's attention assumption: PyTorch SDPA takes the flash / memory-efficient kernels on every GPU
    device (the preflight's attention probe checks it there), the math path on CPU. No profile counts as a GPU."""
    return device_name != "cpu"


def strategy_fits(cfg: LauncherConfig, world_size: int) -> Tuple[List[StrategyFit], Device]:
    device = get_device(cfg.cluster.device if cfg.cluster else "cpu")
    on_gpu = device.name != "cpu"
    precision = cfg.strategy.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    shape = model_shape(cfg.model)
    lora = None
    if cfg.peft.name == "lora":
        try:
            lora = shape.lora_params(cfg.peft.r, target_modules=tuple(cfg.peft.target_modules))
        except ValueError as error:  # a module name the model does not have
            raise ConfigError("peft.target_modules", cfg.peft.target_modules, str(error)) from None
    fits = plan_strategies(
        shape, world_size, device,
        seq_len=cfg.train.seq_len, micro_batch_size=cfg.train.micro_batch_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing, lora_params=lora, precision=precision,
        # Training uses PyTorch SDPA, which takes the flash / memory-efficient kernels on GPUs.
        flash_attention=planner_assumes_flash(device.name),
        offload_optimizer=cfg.strategy.offload_optimizer, offload_params=cfg.strategy.offload_params,
    )
    return fits, device


def memory_report(cfg: LauncherConfig, world_size: int) -> str:
    fits, device = strategy_fits(cfg, world_size)
    return format_strategy_table(fits, device)


def check_fits(cfg: LauncherConfig, world_size: int) -> None:
    """Refuse a submission whose chosen strategy does not fit, unless ignore_memory_estimate=true."""
    if cfg.ignore_memory_estimate:
        return
    fits, device = strategy_fits(cfg, world_size)
    chosen = next(fit for fit in fits if fit.strategy == cfg.strategy.name)
    if not chosen.fits:
        raise ConfigError(
            "strategy", chosen.strategy,
            f"a strategy whose estimate fits {device.name} ({chosen.estimate.total_gib:.1f} GiB needed per device)",
            "set ignore_memory_estimate=true to submit anyway",
            details=format_strategy_table(fits, device),
        )


def model_shape(model_cfg: ModelConfig) -> ModelShape:
    """The planner's view of the model config."""
    return ModelShape.from_config(model_cfg)
