"""What a job holds on each node and what that costs, by each machine's documented rule (login node, stdlib only).

A request for all GPUs of a node, or on a partition that only allocates whole nodes (LUMI standard-g), holds the whole
node: it is exclusive and pays for all of it. A partial request on a shareable partition asks for its share (GPUs,
``cpus_per_task`` per task, ``mem_per_gpu`` per GPU) and pays for that. ``cluster.exclusive=true|false`` overrides.

Shared-node billing counts "GPU slots": max(GPUs, ceil(cores / billing_cores_per_gpu), ceil(mem / billing_mem_gb_per_gpu))
(LUMI small-g/dev-g: 8 cores and 64 GB per GCD slot, 0.5 GPU-hours per GCD-hour; Leonardo: a GPU counts as 8 cores,
about 120 GB each, and a slot is a quarter of a node-hour, 8 core-hours).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from launcher.config.schema import ClusterConfig

UNIT_NAMES = {"gpu_hours": "GPU-hours", "node_hours": "node-hours", "core_hours": "core-hours"}
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.IGNORECASE)
_MEMORY_GB = {"": 1e-3, "K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}  # Slurm's default unit is MB


@dataclass(frozen=True)
class NodeShare:
    """What a job holds on each of its nodes."""

    whole_node: bool
    gpus: int
    cores: int
    mem_gb: Optional[float]  # None: Slurm's default for the request


def memory_gb(text: Optional[str]) -> Optional[float]:
    """``60G`` -> 60.0, ``480000M`` -> 480.0, ``2T`` -> 2000.0 (Slurm's units; a bare number is MB)."""
    if text is None:
        return None
    match = _MEMORY.match(str(text).strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Slurm memory size (e.g. 60G, 480000M)")
    return float(match.group(1)) * _MEMORY_GB[match.group(2).upper()]


def is_whole_node(cluster: ClusterConfig) -> bool:
    """Does the job hold (and pay for) whole nodes? See the module docstring."""
    if cluster.exclusive is not None:
        return cluster.exclusive
    limits = cluster.partitions.get(cluster.partition)
    if limits is not None and limits.exclusive:
        return True
    return cluster.gpus_per_node > 0 and cluster.gpus_requested == cluster.gpus_per_node


def job_memory(cluster: ClusterConfig) -> tuple[Optional[str], Optional[str]]:
    """(``--mem``, ``--mem-per-gpu``) to ask for: a whole node takes ``mem`` (else the per-GPU amount), a share takes
    ``mem_per_gpu`` for each of its GPUs (else ``mem``)."""
    per_gpu = cluster.mem_per_gpu if cluster.gpus_requested else None
    if is_whole_node(cluster):
        return (cluster.mem, None) if cluster.mem else (None, per_gpu)
    return (None, per_gpu) if per_gpu else (cluster.mem, None)


def node_share(cluster: ClusterConfig) -> NodeShare:
    if is_whole_node(cluster):
        return NodeShare(True, cluster.gpus_per_node, cluster.cpus_per_node, None)
    mem, per_gpu = job_memory(cluster)
    mem_gb = memory_gb(mem) if mem else (memory_gb(per_gpu) * cluster.gpus_requested if per_gpu else None)
    return NodeShare(False, cluster.gpus_requested, cluster.tasks * cluster.cpus_per_task, mem_gb)


def gpu_slots(cluster: ClusterConfig, share: NodeShare) -> float:
    """The GPUs a shared-node job is billed for (whole node: all of them)."""
    if share.whole_node:
        return float(cluster.gpus_per_node)
    slots = [share.gpus, math.ceil(share.cores / cluster.billing_cores_per_gpu)]
    if share.mem_gb is not None and cluster.billing_mem_gb_per_gpu:
        slots.append(math.ceil(share.mem_gb / cluster.billing_mem_gb_per_gpu))
    return float(max(slots))


def billing_units(cluster: ClusterConfig, nodes: int, walltime_s: int) -> float:
    """Cost of the requested walltime in the machine's own unit (charged whether used or not)."""
    hours = walltime_s / 3600
    share = node_share(cluster)
    limits = cluster.partitions.get(cluster.partition)
    if limits is not None and limits.billing_per_node_hour is not None:
        return nodes * hours * limits.billing_per_node_hour
    if cluster.billing_unit == "gpu_hours":
        return nodes * hours * gpu_slots(cluster, share) / cluster.gpus_per_billing_gpu
    if cluster.billing_unit == "core_hours":
        return nodes * hours * core_hours_per_node_hour(cluster, share)
    if share.whole_node or not cluster.gpus_per_node:
        return nodes * hours
    return nodes * hours * gpu_slots(cluster, share) / cluster.gpus_per_node


def core_hours_per_node_hour(cluster: ClusterConfig, share: NodeShare) -> float:
    """Cores billed per node and hour: a GPU counts as ``billing_cores_per_gpu`` cores (CINECA's rule)."""
    if share.whole_node:
        return float(cluster.cpus_per_node)
    return max(float(share.cores), gpu_slots(cluster, share) * cluster.billing_cores_per_gpu if share.gpus else 0.0)


def core_hours(cluster: ClusterConfig, nodes: int, walltime_s: int) -> float:
    """The same request in core-hours (what Leonardo's ``saldo -b`` reports)."""
    return nodes * walltime_s / 3600 * core_hours_per_node_hour(cluster, node_share(cluster))


def idle_gpu_warning(cluster: ClusterConfig) -> Optional[str]:
    """An exclusive job that asks for fewer GPUs than the node has pays for the others."""
    idle = cluster.gpus_per_node - cluster.gpus_requested
    if not is_whole_node(cluster) or idle <= 0:
        return None
    return (f"WARNING: this job holds whole nodes but uses {cluster.gpus_requested} of {cluster.gpus_per_node} GPUs: it "
            f"pays for {idle} idle GPUs per node (partition {cluster.partition} or cluster.exclusive=true); on a "
            "shareable partition leave cluster.exclusive unset to pay only for the share")
