"""Host (CPU) memory per node: the model while it is loaded, offloaded states during training, and a per-rank allowance.

Imported on the login node: stdlib only. The per-device estimate (``launcher.plan.memory``) says what each rank keeps
on its accelerator; this says what the node's RAM must hold, which Slurm's cgroup limit (the job's ``--mem`` /
``--mem-per-gpu`` request) enforces: one process over it and the job is killed before its first step.

Three terms per node, with R ranks on the node:

* **load**: how many full copies of the model exist on the host while it is built or read, in which dtype.
  ``LOAD_RULES`` is the table, keyed by (engine, shards parameters, low-memory loading). The job loads low-memory
  (``JOB_LOW_MEMORY_LOAD = True``; each strategy's ``placement`` in ``launcher/train/strategies``): fsdp reads the full
  weights on rank 0 alone, in the training precision, the other ranks build shapes on the meta device (plus one 1 GiB
  fp32 chunk being broadcast, inside the allowance); zero3 builds under ``deepspeed.zero.Init`` and only rank 0 reads
  the checkpoint; ddp/zero1/zero2 load straight onto their device. One copy per node at most (on the node of rank 0),
  none for replicated strategies, whatever the node count. The ``False`` rows are the job before issue 15 (every rank
  built the full model in fp32 on CPU: R x 4 B/param), kept to show what low-memory loading changed.
* **steady**: during training, what lives on the host. With ``offload_optimizer`` / ``offload_params`` that is
  ``MemoryEstimate.offloaded`` per rank (fp32 master weights, Adam moments, gradient shards, parameter shards) times
  R, plus DeepSpeed's pinned staging buffers (``deepspeed_pinned_bytes``). On a CPU "device" everything is on the
  host: R x (the per-rank total + offloaded).
* **allowance**: ``RANK_ALLOWANCE_BYTES`` (2 GiB) per rank for the process itself (Python, torch, the device runtime)
  and the dataloader, which reads the tokenized cache memory-mapped (only touched pages are resident) and pins one
  micro-batch ahead. A fixed allowance, not a measurement.

The peak is max(load, steady) + allowance: the full copies built at load are freed (moved to the device or sharded)
before the optimizer and its host buffers exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from launcher.config.strategies import strategy_spec
from launcher.plan.devices import GIB

# What the job does: every strategy's ``placement`` (launcher/train/strategies) builds low-memory since issue 15.
# The planner, the dry run and the gate follow LOAD_RULES.
JOB_LOW_MEMORY_LOAD = True

RANK_ALLOWANCE_BYTES = 2 * GIB  # per rank: the process (python, torch, device runtime) and the dataloader

# DeepSpeed ZeRO-3's sub_group_size (deepspeed/runtime/zero/config.py default): with offload_optimizer it allocates
# one sub-group's fp32 gradient buffer in pinned host memory while it initializes the optimizer (stage3.py).
DS_SUB_GROUP_SIZE = 10**9

_PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class LoadRule:
    """How many full copies of the model a node holds while the model is built or loaded, and in which dtype."""

    copies: str  # "rank": one per rank; "node": one per node; "none": the weights go straight to the device
    dtype: str  # "fp32", or "training": the training precision (bf16 on GPUs)
    how: str  # one line for the dry run and the gate's error


# The job before issue 15 (low_memory_load=False): what the planner compares with.
_TODAY = "every rank builds the full model in fp32 on CPU (launcher/train/modeling.py), then the strategy casts/shards"
# (engine, shards parameters, low-memory loading) -> rule. Only this table and JOB_LOW_MEMORY_LOAD describe the job.
LOAD_RULES: Dict[Tuple[str, bool, bool], LoadRule] = {
    ("ddp", False, False): LoadRule("rank", "fp32", _TODAY),
    ("deepspeed", False, False): LoadRule("rank", "fp32", _TODAY),
    ("deepspeed", True, False): LoadRule("rank", "fp32", _TODAY),
    ("fsdp2", True, False): LoadRule("rank", "fp32", _TODAY),
    ("ddp", False, True): LoadRule("none", "training", "each rank loads straight onto its device, no host copy"),
    ("deepspeed", False, True): LoadRule("none", "training", "each rank loads straight onto its device, no host copy"),
    ("deepspeed", True, True): LoadRule("node", "training", "zero.Init: rank 0 reads one copy, each rank keeps its "
                                        "partition"),
    ("fsdp2", True, True): LoadRule("node", "training", "rank 0 reads one copy, the others build on the meta device "
                                    "and receive their shards"),
}


def load_rule(strategy: str, low_memory_load: bool = JOB_LOW_MEMORY_LOAD) -> LoadRule:
    """The row of ``LOAD_RULES`` for ``strategy``."""
    spec = strategy_spec(strategy)
    return LOAD_RULES[(spec.engine, spec.shards >= 3, low_memory_load)]


def copy_bytes(rule: LoadRule, n_params: int, precision: str) -> int:
    """Bytes of one full copy of the model under ``rule``."""
    per_param = 4 if rule.dtype == "fp32" else _PRECISION_BYTES[precision]
    return n_params * per_param


def load_bytes(rule: LoadRule, n_params: int, ranks_per_node: int, precision: str) -> int:
    """Bytes per node at load time: the copies of ``rule`` times one copy's size."""
    copies = {"rank": ranks_per_node, "node": 1, "none": 0}[rule.copies]
    return copies * copy_bytes(rule, n_params, precision)


def deepspeed_pinned_bytes(zero_stage: int, trainable: int, world_size: int, largest_layer: int) -> int:
    """Per rank: DeepSpeed's host staging buffers under ``offload_optimizer`` beyond the offloaded states themselves.

    From deepspeed 0.19's sources (pinned when the job pins, i.e. on GPUs; counted against the cgroup either way):
    ZeRO-1/2 (``stage_1_and_2.py``) keep a 16-bit copy of the rank's partition (``param_buffer_of_bit16_for_cpu_
    offload_groups``, 2 B/param of the shard) and a gradient staging buffer the size of the largest parameter
    (``temp_grad_buffer_for_cpu_offload``, 2 B); ZeRO-3 (``stage3.py``) builds one sub-group's fp32 gradient buffer,
    4 B x min(sub_group_size, shard), while it initializes the optimizer.
    """
    shard = -(-trainable // world_size)
    if zero_stage in (1, 2):
        return 2 * shard + 2 * min(largest_layer, trainable)
    if zero_stage == 3:
        return 4 * min(DS_SUB_GROUP_SIZE, shard)
    return 0


@dataclass(frozen=True)
class HostPlan:
    """Bytes of host memory per node, against what the job may use there."""

    ranks_per_node: int
    budget: int  # the job's memory on one node (its request, at most the node's usable memory)
    load: int
    steady: int  # offloaded states and pinned buffers (a CPU device: all training states)
    allowance: int  # RANK_ALLOWANCE_BYTES per rank
    rule: LoadRule
    copy: int  # bytes of one full copy under ``rule``
    on_cpu: bool = False  # the ranks train on the CPU: ``steady`` holds every training state, not only offloaded ones

    @property
    def peak(self) -> int:
        return max(self.load, self.steady) + self.allowance

    @property
    def load_fits(self) -> bool:
        return self.load + self.allowance <= self.budget

    @property
    def steady_fits(self) -> bool:
        return self.steady + self.allowance <= self.budget

    @property
    def fits(self) -> bool:
        return self.load_fits and self.steady_fits


def plan_host(
    strategy: str,
    *,
    n_params: int,
    offloaded: int,
    device_total: int,
    ranks_per_node: int,
    world_size: int,
    budget_bytes: int,
    precision: str,
    on_cpu: bool = False,
    offload_optimizer: bool = False,
    trainable: int = 0,
    largest_layer: int = 0,
    low_memory_load: bool = JOB_LOW_MEMORY_LOAD,
) -> HostPlan:
    """Host memory per node for ``strategy``: ``offloaded`` and ``device_total`` are one rank's
    ``MemoryEstimate.offloaded`` / ``.total``; ``offload_optimizer`` is what the strategy really offloads."""
    if ranks_per_node < 1 or budget_bytes <= 0:
        raise ValueError(f"ranks_per_node and budget_bytes must be positive, got {ranks_per_node}, {budget_bytes}")
    rule = load_rule(strategy, low_memory_load)
    steady = ranks_per_node * offloaded
    spec = strategy_spec(strategy)
    if offload_optimizer and spec.engine == "deepspeed":
        steady += ranks_per_node * deepspeed_pinned_bytes(spec.shards, trainable, world_size, largest_layer)
    if on_cpu:
        steady += ranks_per_node * device_total
    return HostPlan(
        ranks_per_node=ranks_per_node,
        budget=budget_bytes,
        load=load_bytes(rule, n_params, ranks_per_node, precision),
        steady=steady,
        allowance=ranks_per_node * RANK_ALLOWANCE_BYTES,
        rule=rule,
        copy=copy_bytes(rule, n_params, precision),
        on_cpu=on_cpu,
    )
