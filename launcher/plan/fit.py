"""The memory plan shown by every dry run, and the check that stops a submission that would run out of memory: on the
device (``launcher.plan.memory``) and in the node's host memory (``launcher.plan.host``)."""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple

from launcher.config.schema import ClusterConfig, LauncherConfig, ModelConfig
from launcher.config.strategies import strategy_spec
from launcher.errors import ConfigError
from launcher.plan import ModelShape, StrategyFit, format_strategy_table, get_device, plan_strategies
from launcher.plan.billing import job_memory, memory_gb
from launcher.plan.devices import GIB, Device
from launcher.plan.devices import planner_assumes_flash  # noqa: F401 (the plan's assumption, re-exported)
from launcher.plan.host import JOB_LOW_MEMORY_LOAD, HostPlan, plan_host
from launcher.plan.memory import qlora_quantized_params


def strategy_fits(cfg: LauncherConfig, world_size: int) -> Tuple[List[StrategyFit], Device]:
    """Every strategy against the profile's device and, with a profile, the host memory of each node."""
    device = get_device(cfg.cluster.device if cfg.cluster else "cpu")
    on_gpu = device.name != "cpu"
    precision = cfg.strategy.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    shape = planned_shape(cfg)
    lora = None
    if cfg.peft.name in ("lora", "qlora"):
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
        quantized_params=qlora_quantized_params(shape) if cfg.peft.name == "qlora" else 0,
    )
    budget = host_budget_bytes(cfg.cluster) if cfg.cluster else None
    if budget is not None:
        fits = [_with_host(fit, cfg, shape, lora, precision, budget, on_cpu=not on_gpu) for fit in fits]
    return fits, device


def host_budget_bytes(cluster: ClusterConfig) -> Optional[int]:
    """Host memory the job may use on one node: its Slurm request (``--mem``, or ``--mem-per-gpu`` x its GPUs: the
    share of a partial node), at most ``cluster.host_mem_gb``; None when neither is known (host not planned).
    Slurm's G is 1024 M, so both are read as GiB."""
    if cluster.host_mem_gb is not None and not cluster.host_mem_gb > 0:
        raise ConfigError("cluster.host_mem_gb", cluster.host_mem_gb, "a positive size in GiB (Slurm's G)")
    mem, per_gpu = job_memory(cluster)
    request = memory_gb(mem) if mem else (memory_gb(per_gpu) * cluster.gpus_requested if per_gpu else None)
    known = [gb for gb in (request, cluster.host_mem_gb) if gb is not None]
    return int(min(known) * GIB) if known else None


def _with_host(fit: StrategyFit, cfg: LauncherConfig, shape: ModelShape, lora: Optional[int], precision: str,
               budget: int, *, on_cpu: bool) -> StrategyFit:
    """``fit`` with its host plan per node (and the same under low-memory loading while the job lacks it)."""
    spec = strategy_spec(fit.strategy)

    def plan(low_memory_load: bool) -> HostPlan:
        assert cfg.cluster is not None
        return plan_host(
            fit.strategy, n_params=shape.n_params() + (lora or 0), offloaded=fit.estimate.offloaded,
            device_total=fit.estimate.total, ranks_per_node=cfg.cluster.tasks, world_size=fit.estimate.world_size,
            budget_bytes=budget, precision=precision, on_cpu=on_cpu,
            offload_optimizer=cfg.strategy.offload_optimizer and spec.can_offload_optimizer,
            trainable=shape.n_params() if lora is None else lora, largest_layer=shape.largest_layer_params(),
            low_memory_load=low_memory_load,
        )

    host = plan(JOB_LOW_MEMORY_LOAD)
    later = None if JOB_LOW_MEMORY_LOAD else plan(True)
    return replace(fit, host=host, host_low_memory=later)


def memory_report(cfg: LauncherConfig, world_size: int) -> str:
    fits, device = strategy_fits(cfg, world_size)
    return format_strategy_table(fits, device)


def check_fits(cfg: LauncherConfig, world_size: int) -> None:
    """Refuse a submission whose chosen strategy does not fit its device, or whose load or offload does not fit the
    node's host memory, unless ignore_memory_estimate=true. The table goes in the error's details."""
    if cfg.ignore_memory_estimate:
        return
    fits, device = strategy_fits(cfg, world_size)
    chosen = next(fit for fit in fits if fit.strategy == cfg.strategy.name)
    if chosen.fits_node:
        return
    reasons, hints = [], []
    if not chosen.fits:
        reasons.append(f"a strategy whose estimate fits {device.name} ({chosen.estimate.total_gib:.1f} GiB needed "
                       "per device)")
        hints.append("more nodes or a sharded strategy: see the table")
    host = chosen.host
    if host is not None and not host.load_fits:
        reasons.append(_load_reason(host))
        hints.append(_load_hint(host, fits))
    if host is not None and not host.steady_fits:
        what = "training states of the CPU ranks" if host.on_cpu else "offloaded states and pinned buffers"
        reasons.append(f"host memory during training: {host.steady / GIB:.1f} GiB per node of {what}"
                       f" ({host.ranks_per_node} ranks) + {host.allowance / GIB:.0f} GiB, more than the job's"
                       f" {host.budget / GIB:.1f} GiB")
        hints.append("use more nodes (each rank's shard shrinks with the world size) or fewer ranks per node"
                     if host.on_cpu else "use more nodes (each rank's offloaded shard shrinks with the world size) or"
                     " offload less (strategy.offload_optimizer=false / strategy.offload_params=false with a sharded"
                     " strategy)")
    only_load = chosen.fits and host is not None and host.steady_fits
    no_load_fits = all(fit.host is not None and not fit.host.load_fits for fit in fits)
    field, value = ("model", cfg.model.name) if only_load and no_load_fits else ("strategy", chosen.strategy)
    hints.append("set ignore_memory_estimate=true to submit anyway")
    raise ConfigError(field, value, "; ".join(reasons), "; ".join(hints), details=format_strategy_table(fits, device))


def _load_reason(host: HostPlan) -> str:
    copies = {"rank": host.ranks_per_node, "node": 1, "none": 0}[host.rule.copies]
    return (f"host memory at load: {host.rule.how}: {copies} x {host.copy / GIB:.1f} GiB + {host.allowance / GIB:.0f}"
            f" GiB (process, dataloader) = {(host.load + host.allowance) / GIB:.1f} GiB per node, more than the"
            f" job's {host.budget / GIB:.1f} GiB")


def _load_hint(host: HostPlan, fits: List[StrategyFit]) -> str:
    if host.rule.copies == "rank":
        sharded = [fit.strategy for fit in fits if fit.host and fit.host.load_fits]
        if sharded:
            return f"a strategy whose load fits: {', '.join(sharded)}"
        return ("no node count or strategy shrinks the load while every rank holds the whole model: a smaller"
                " model, or a node share with more memory (cluster.mem / cluster.mem_per_gpu)")
    return "a sharded strategy (zero3, fsdp), or a node share with more memory (cluster.mem / cluster.mem_per_gpu)"


def model_shape(model_cfg: ModelConfig) -> ModelShape:
    """The planner's view of the model config."""
    return ModelShape.from_config(model_cfg)


def planned_shape(cfg: LauncherConfig) -> ModelShape:
    """The model the run trains: for ``task=classification`` a hidden x num_labels head instead of the LM head, with
    the labels the login node finds in the first records of the data (the head is tiny: a label seen only later
    changes nothing that matters)."""
    shape = model_shape(cfg.model)
    if cfg.task.name != "classification":
        return shape
    from launcher.config.check_data import RECORDS_CHECKED
    from launcher.train.labelled_data import iter_labelled, label_names

    try:
        labels = label_names([label for _, label in iter_labelled(
            cfg.data.path, cfg.task.text_field, cfg.task.label_field, max_records=RECORDS_CHECKED)])
    except (OSError, ValueError, UnicodeDecodeError):  # validation names the problem; plan with two classes
        labels = ["0", "1"]
    return replace(shape, num_labels=max(2, len(labels)))
