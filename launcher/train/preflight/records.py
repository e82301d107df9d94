"""What one rank reports about itself: host, device, visible GPUs, CPU affinity, NUMA nodes, relevant environment.

``collect_record`` runs on every rank; everything else here is a pure helper (tests call them with fake inputs).
Module import is stdlib only (torch is imported inside ``collect_record``).
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any, Dict, Iterable, List, Mapping, Optional

from launcher.secrets import is_secret_name

# Variables that choose which GPUs a process sees (innermost last for ROCm: ROCR filters, then HIP/CUDA index into it).
VISIBLE_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL")
SLURM_GPU_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
# The environment that decides how the job communicates and binds; recorded per rank.
ENV_PREFIXES = ("NCCL_", "RCCL_", "TORCH_NCCL_", "FI_", "CXI_", "HSA_", "MIOPEN_", "CUDA_", "HIP_", "ROCR_", "UCX_")
ENV_NAMES = (
    "OMP_NUM_THREADS", "GPU_MAX_HW_QUEUES", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_CPUS_PER_TASK", "SLURM_CPU_BIND", "SLURM_CPU_BIND_LIST",
    "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_PER_TASK", "SLURM_GPUS_ON_NODE",
)
MAX_ENV_VALUE = 200


def format_ints(values: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 8, 10, 11]`` -> ``"0-3,8,10-11"`` (the cpulist format of Linux and Slurm)."""
    items = sorted(set(int(v) for v in values))
    parts: List[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)


def parse_ints(text: str) -> set:
    """Inverse of ``format_ints``: ``"0-3,8"`` -> ``{0, 1, 2, 3, 8}`` (empty string -> empty set)."""
    out: set = set()
    for part in (text or "").strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(part))
    return out


def relevant_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """The communication/binding variables of ``environ``; names that look like secrets are never included."""
    out = {}
    for name in sorted(environ):
        if is_secret_name(name):
            continue
        if name in ENV_NAMES or name.startswith(ENV_PREFIXES):
            value = str(environ[name])
            out[name] = value if len(value) <= MAX_ENV_VALUE else value[:MAX_ENV_VALUE] + "..."
    return out


def _numa_cpulists(root: str = "/sys/devices/system/node") -> Dict[int, set]:
    """NUMA node -> its CPUs, from sysfs (empty where there is no sysfs)."""
    out: Dict[int, set] = {}
    try:
        names = os.listdir(root)
    except OSError:
        return out
    for name in names:
        m = re.fullmatch(r"node(\d+)", name)
        if not m:
            continue
        try:
            with open(os.path.join(root, name, "cpulist")) as fh:
                out[int(m.group(1))] = parse_ints(fh.read())
        except (OSError, ValueError):
            continue
    return out


def _pci_numa(pci: Optional[str]) -> Optional[int]:
    """The NUMA node of a PCI device (``0000:c1:00``), or None when unknown."""
    if not pci:
        return None
    try:
        with open(f"/sys/bus/pci/devices/{pci}.0/numa_node") as fh:
            node = int(fh.read().strip())
        return node if node >= 0 else None
    except (OSError, ValueError):
        return None


def _physical_gpu(index: int, environ: Mapping[str, str], hip: bool) -> str:
    """Map a torch device index through the visible-device variables to what the node calls that GPU."""
    layers = ["ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES" if environ.get("HIP_VISIBLE_DEVICES") else
              "CUDA_VISIBLE_DEVICES"] if hip else ["CUDA_VISIBLE_DEVICES"]
    value: Any = index
    for var in reversed(layers):
        listed = [v.strip() for v in (environ.get(var) or "").split(",") if v.strip()]
        if not listed:
            continue
        if isinstance(value, int) and value < len(listed):
            value = listed[value]
            value = int(value) if value.isdigit() else value
    return str(value)


def _gpu_info(torch: Any, device: Any, environ: Mapping[str, str]) -> Dict[str, Any]:
    """Name, identity (PCI bus id, else UUID, else mapped index) and NUMA node of the rank's GPU."""
    info: Dict[str, Any] = {"gpu_name": None, "gpu_id": None, "gpu_id_kind": None, "gpu_pci": None,
                            "gpu_uuid": None, "gpu_physical": None, "numa_gpu": None}
    if getattr(device, "type", str(device)) != "cuda":
        return info
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
    except Exception as e:  # noqa: BLE001 - report what failed instead of crashing the preflight
        info["gpu_error"] = f"{type(e).__name__}: {e}"
        return info
    info["gpu_name"] = getattr(props, "name", None)
    bus, dev = getattr(props, "pci_bus_id", None), getattr(props, "pci_device_id", None)
    dom = getattr(props, "pci_domain_id", 0) or 0
    if isinstance(bus, int) and isinstance(dev, int) and (dom or bus or dev):
        info["gpu_pci"] = f"{dom:04x}:{bus:02x}:{dev:02x}"
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid and set(re.sub(r"[^0-9a-fA-F]", "", uuid.replace("GPU-", ""))) - {"0"}:
        info["gpu_uuid"] = uuid
    info["gpu_physical"] = _physical_gpu(index, environ, hip=bool(getattr(torch.version, "hip", None)))
    # PCI bus id first (unique per node, also where ROCm reports blank UUIDs), then UUID, then the mapped index,
    # which cgroups may renumber (every task sees "0" under Slurm's device constraint): only a weak identity.
    if info["gpu_pci"]:
        info["gpu_id"], info["gpu_id_kind"] = info["gpu_pci"], "pci"
    elif info["gpu_uuid"]:
        info["gpu_id"], info["gpu_id_kind"] = info["gpu_uuid"], "uuid"
    else:
        info["gpu_id"], info["gpu_id_kind"] = info["gpu_physical"], "index"
    info["numa_gpu"] = _pci_numa(info["gpu_pci"])
    return info


def collect_record(rank: int, local_rank: int, device: Any, *,
                   environ: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """What this rank sees: host, device, visible GPUs, CPU affinity, NUMA nodes and the relevant environment."""
    import torch

    environ = os.environ if environ is None else environ
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    numa = _numa_cpulists()
    cpu_set = set(cpus)
    try:
        gpu_count = int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        gpu_count = 0
    record: Dict[str, Any] = {
        "rank": int(rank),
        "local_rank": int(local_rank),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
        "device_type": getattr(device, "type", str(device)),
        "gpu_count": gpu_count,
        "visible": {var: environ[var] for var in VISIBLE_VARS + SLURM_GPU_VARS if var in environ},
        "cpus": format_ints(cpus),
        "n_cpus": len(cpus),
        "numa_cpu": sorted(node for node, node_cpus in numa.items() if node_cpus & cpu_set),
        "torch": torch.__version__,
        "runtime": ("rocm " + str(torch.version.hip)) if getattr(torch.version, "hip", None) else (
            ("cuda " + str(torch.version.cuda)) if torch.version.cuda else "cpu"),
        "env": relevant_env(environ),
    }
    record.update(_gpu_info(torch, device, environ))
    return record


def error_record(rank: int, local_rank: int, device: Any, error: BaseException) -> Dict[str, Any]:
    """The record of a rank that could not inspect itself (it still joins the gather, so every rank hears of it)."""
    return {"rank": int(rank), "local_rank": int(local_rank), "host": socket.gethostname(), "device": str(device),
            "device_type": getattr(device, "type", str(device)), "record_error": f"{type(error).__name__}: {error}"}
