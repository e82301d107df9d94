"""Preflight inside the allocation: every rank reports, rank 0 checks, all ranks stop together on failure.

Called once by every rank after ``torch.distributed.init_process_group`` and before the model is built::

    report = run_preflight(cfg, rank=env.rank, local_rank=env.local_rank, world_size=env.world_size,
                           device=env.device, run_dir=run_dir)

What it does (docs/preflight.md has sample output and what to do about each finding):

1. each rank collects a record (``collect_record``): host, ranks, torch device, visible-device variables and what
   torch sees (count, name, PCI bus id / UUID), CPU affinity as a range string, NUMA nodes of its CPUs and of its
   GPU, and the communication-related environment (never a variable whose name looks like a secret);
   ``all_gather_object`` gives every rank every record; on GPUs the record also holds the attention probe
   (``launcher.train.attention_probe``: do the flash / memory-efficient SDPA kernels the memory plan assumed run here);
2. rank 0 checks the records (pure functions, unit-tested on fabricated records): a required GPU that a rank does
   not see, two ranks of one host on one physical GPU, overlapping CPU sets or fewer CPUs than
   ``cluster.cpus_per_task``; it broadcasts the verdict, and on failure every rank raises ``PreflightError``
   with the same message before any collective touches a broken device;
3. a short all-reduce (32 MiB on GPUs, 4 MiB on CPU) checks the sum and measures bus bandwidth (nccl-tests'
   definition: ``bytes * 2 (n-1) / n / time``), compared with ``expected_busbw_gbps``;
4. the NCCL/RCCL transport (``detect_transport``) is read from the NCCL debug log of each node's local rank 0
   when there is one: socket fallback in a multi-node job is a loud warning (or a failure if asked);
5. rank 0 decides again, broadcasts, prints a table (one line per rank) and writes ``<run_dir>/preflight.json``.

A watchdog ends the process with ``EXIT_PREFLIGHT`` when the preflight is not finished after ``timeout_s`` (a missing
rank or a hung network would otherwise block the first collective for the process group's whole timeout).

Imported only inside the job; module import is stdlib only (torch is imported inside the functions).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# Exit code for a failed or timed-out preflight (run() maps PreflightError to it; the watchdog uses it directly).
EXIT_PREFLIGHT = 4

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
# Never record a variable whose name contains one of these (upper-cased comparison).
SECRET_MARKERS = ("TOKEN", "SECRET", "KEY", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
MAX_ENV_VALUE = 200

# All-reduce sizes and repetitions: cheap (well under a second on 2 CPU ranks) but past the latency regime on GPUs.
GPU_BYTES = 32 * 2**20
CPU_BYTES = 4 * 2**20
GPU_WARMUP, GPU_ITERS = 2, 5
CPU_WARMUP, CPU_ITERS = 1, 3
WARN_BANDWIDTH_FRACTION = 0.5

# detect_transport results; the slow ones make a multi-node job warn.
TRANSPORTS = ("socket", "ofi-tcp", "ib", "cxi", "ofi", "unknown")
SLOW_TRANSPORTS = ("socket", "ofi-tcp")

# How many lines of one check a message or a table shows (all of them are in preflight.json).
MAX_LINES_PER_CHECK = 8


class PreflightError(RuntimeError):
    """The preflight failed: raised on every rank with the same message; ``report`` holds the details."""

    def __init__(self, message: str, report: Optional["PreflightReport"] = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Finding:
    level: str  # "fail" | "warn" | "info"
    check: str  # device | gpu_sharing | cpu_binding | numa | allreduce | bandwidth | transport | world | attention
    message: str
    ranks: List[int] = field(default_factory=list)
    hint: str = ""

    def line(self) -> str:
        return f"{self.level.upper():4} {self.check}: {self.message}"


@dataclass
class PreflightReport:
    ok: bool
    world_size: int
    hosts: List[str]
    findings: List[Finding]
    records: List[Dict[str, Any]]  # one per rank, by rank
    bandwidth: Dict[str, Any]  # bytes, time_s, algbw_gbps, busbw_gbps, expected_busbw_gbps (GB/s = 1e9 B/s)
    transport: str  # the slowest transport any node reported, or "n/a" (gloo) / "unknown"
    backend: str
    elapsed_s: float
    json_path: Optional[str] = None

    @property
    def failures(self) -> List[Finding]:
        return [f for f in self.findings if f.level == "fail"]

    @property
    def warnings(self) -> List[Finding]:
        return [f for f in self.findings if f.level == "warn"]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        bw = self.bandwidth
        if bw.get("busbw_gbps") is not None:
            expected = bw.get("expected_busbw_gbps")
            bw_text = (f"all-reduce {_mib(bw['bytes'])}: busbw {bw['busbw_gbps']:.2f} GB/s"
                       + (f" (expected {expected:g})" if expected else ""))
        else:
            bw_text = f"all-reduce: {bw.get('skipped', 'not measured')}"
        devices = sorted({r.get("gpu_name") or r.get("device_type", "?") for r in self.records})
        return (f"{self.world_size} rank(s) on {len(self.hosts)} host(s), backend {self.backend}, "
                f"{'/'.join(devices)}; {bw_text}; transport {self.transport}")

    def format_table(self, max_rows: int = 256) -> str:
        return format_table(self, max_rows=max_rows)

    def message(self) -> str:
        return format_failure(self)


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers


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


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


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


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MiB"


def _cfg_get(cfg: Any, *keys: str, default: Any = None) -> Any:
    """``cfg[k1][k2]...`` for plain dicts and OmegaConf configs alike; ``default`` when any level is missing/None."""
    node = cfg
    for key in keys:
        if node is None:
            return default
        try:
            node = node.get(key)
        except Exception:  # noqa: BLE001 - not a mapping, or an OmegaConf key error: treat as unset
            return default
    return default if node is None else node


def preflight_enabled(cfg: Any) -> bool:
    """``train.preflight`` (default true): whether the job should call ``run_preflight``."""
    return bool(_cfg_get(cfg, "train", "preflight", default=True))


# ---------------------------------------------------------------------------------------------------------------
# NCCL / RCCL transport from the debug log

_SOCKET_STRONG = re.compile(r"Using network Socket\b|via NET/Socket|Initialized NET plugin Socket", re.I)
_SOCKET_WEAK = re.compile(r"NET/Socket\s*:\s*Using\s*\[", re.I)
_IB_STRONG = re.compile(r"Using network IB\b|via NET/IB|Initialized NET plugin IB\b", re.I)
_IB_WEAK = re.compile(r"NET/IB\s*:\s*Using\s*\[", re.I)
_OFI_PROVIDER = re.compile(r"Selected provider is\s+([A-Za-z0-9_;+-]+)", re.I)
_OFI_ANY = re.compile(
    r"NET/OFI|Using network (?:AWS )?Libfabric|via NET/(?:AWS )?Libfabric|Using network OFI|"
    r"Initialized NET plugin (?:AWS )?Libfabric|aws-ofi-[rn]ccl", re.I,
)


def detect_transport(log_text: str) -> str:
    """The inter-node transport an NCCL/RCCL ``NCCL_DEBUG=INFO`` log shows.

    Returns ``"socket"`` (NET/Socket: the TCP fallback), ``"ofi-tcp"`` (the libfabric plugin on its tcp/sockets
    provider, also a fallback), ``"ib"`` (NET/IB: InfiniBand/RoCE verbs), ``"cxi"`` (the aws-ofi-rccl/nccl plugin
    on Slingshot's cxi provider), ``"ofi"`` (the libfabric plugin, provider not shown) or ``"unknown"``.
    When the text holds several ranks' logs and they disagree, the slowest transport wins: one node on sockets
    slows every collective of the job.
    """
    text = log_text or ""
    providers = [p.lower().split(";")[0] for p in _OFI_PROVIDER.findall(text)]
    slow_provider = any(p in ("tcp", "sockets", "udp", "tcp;ofi_rxm") or p.startswith("tcp") for p in providers)
    if _SOCKET_STRONG.search(text):
        return "socket"
    if slow_provider:
        return "ofi-tcp"
    if "cxi" in providers:
        return "cxi"
    if providers or _OFI_ANY.search(text):
        # The plugin was loaded; a weak socket line (e.g. its bootstrap) does not mean the data path is TCP.
        return "ofi"
    if _IB_STRONG.search(text):
        return "ib"
    if _SOCKET_WEAK.search(text):
        return "socket"
    if _IB_WEAK.search(text):
        return "ib"
    return "unknown"


_EVIDENCE = re.compile(
    r"Using network|NET/Plugin|NET/IB|NET/Socket|NET/OFI|Selected provider|Initialized NET plugin", re.I
)


def transport_evidence(log_text: str, limit: int = 6) -> List[str]:
    """The log lines ``detect_transport`` looked at (first ``limit``), for the report."""
    lines = []
    for line in (log_text or "").splitlines():
        if _EVIDENCE.search(line):
            lines.append(line.strip()[:300])
            if len(lines) >= limit:
                break
    return lines


def expand_nccl_debug_file(pattern: str, *, host: Optional[str] = None, pid: Optional[int] = None) -> str:
    """NCCL_DEBUG_FILE's ``%h`` (host name up to the first dot) and ``%p`` (pid) substitutions."""
    host = (host or socket.gethostname()).split(".")[0]
    return pattern.replace("%h", host).replace("%p", str(os.getpid() if pid is None else pid))


# ---------------------------------------------------------------------------------------------------------------
# Per-rank record


def _numa_cpulists(root: str = "/sys/devices/system/node") -> Dict[int, set]:
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
    numa_cpu = sorted(node for node, node_cpus in numa.items() if node_cpus & cpu_set)
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
        "numa_cpu": numa_cpu,
        "torch": torch.__version__,
        "runtime": ("rocm " + str(torch.version.hip)) if getattr(torch.version, "hip", None) else (
            ("cuda " + str(torch.version.cuda)) if torch.version.cuda else "cpu"),
        "env": relevant_env(environ),
    }
    record.update(_gpu_info(torch, device, environ))
    return record


# ---------------------------------------------------------------------------------------------------------------
# Checks on gathered records (pure: rank 0 runs them; tests feed fabricated records)


def _who(r: Mapping[str, Any]) -> str:
    return f"rank {r['rank']} (host {r['host']}, local rank {r['local_rank']})"


def _saw(r: Mapping[str, Any]) -> str:
    visible = r.get("visible") or {}
    shown = [f"{v}={visible[v]!r}" for v in VISIBLE_VARS if v in visible]
    unset = [v for v in VISIBLE_VARS[:3] if v not in visible]
    parts = [f"torch.cuda.device_count()={r.get('gpu_count', 0)}"] + shown
    if unset:
        parts.append("/".join(unset) + " unset")
    parts.append(f"running on {r.get('device', '?')}")
    return ", ".join(parts)


def _by_host(records: Sequence[Mapping[str, Any]]) -> Dict[str, List[Mapping[str, Any]]]:
    hosts: Dict[str, List[Mapping[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["rank"]):
        hosts.setdefault(r["host"], []).append(r)
    return hosts


def check_devices(records: Sequence[Mapping[str, Any]], *, require_device: bool,
                  device_name: Optional[str] = None) -> List[Finding]:
    """(1) Every rank sees a GPU and runs on it when one is required; all ranks use the same kind of device."""
    findings = []
    need = f"cluster.device={device_name} needs one" if device_name else "a GPU is required"
    if require_device:
        for r in sorted(records, key=lambda r: r["rank"]):
            if r.get("gpu_count", 0) < 1:
                findings.append(Finding(
                    "fail", "device", f"{_who(r)}: no GPU visible ({need}): {_saw(r)}", [r["rank"]],
                    "check the job's GPU request (--gpus-per-node / --gpus-per-task), cluster.visible_devices_var and "
                    "the container's GPU access (--nv on Leonardo, the ROCm binds on LUMI); for a CPU run set "
                    "cluster.device=cpu and cluster.backend=gloo",
                ))
            elif r.get("device_type") != "cuda":
                findings.append(Finding(
                    "fail", "device", f"{_who(r)}: sees {r['gpu_count']} GPU(s) but runs on {r.get('device')} "
                    f"({need})", [r["rank"]], "the job must pick cuda:<local index> before init_process_group",
                ))
            elif r.get("gpu_error"):
                findings.append(Finding("fail", "device", f"{_who(r)}: GPU properties failed: {r['gpu_error']}",
                                        [r["rank"]], "the driver or the device is broken: exclude the node"))
    kinds: Dict[str, List[int]] = {}
    for r in records:
        kinds.setdefault(str(r.get("device_type")), []).append(int(r["rank"]))
    if len(kinds) > 1:
        spread = "; ".join(f"{kind} on ranks {format_ints(ranks)}" for kind, ranks in sorted(kinds.items()))
        findings.append(Finding("fail", "device", f"ranks run on different kinds of device: {spread}",
                                sorted(r["rank"] for r in records),
                                "every rank must run on the same kind of device"))
    return findings


def check_gpu_sharing(records: Sequence[Mapping[str, Any]]) -> List[Finding]:
    """(2) No two ranks of one host on the same physical GPU.

    Identified by PCI bus id or UUID: a duplicate fails. When only the visible index is known (cgroups may make every
    task see its own GPU as "0"), a duplicate is a warning.
    """
    findings = []
    for host, ranks in _by_host(records).items():
        groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {}
        for r in ranks:
            if r.get("device_type") == "cuda" and r.get("gpu_id") is not None:
                groups.setdefault((str(r.get("gpu_id_kind")), str(r["gpu_id"])), []).append(r)
        for (kind, gpu_id), same in sorted(groups.items()):
            if len(same) < 2:
                continue
            names = ", ".join(f"rank {r['rank']} (local {r['local_rank']}, {r.get('device')})" for r in same)
            strong = kind in ("pci", "uuid")
            findings.append(Finding(
                "fail" if strong else "warn", "gpu_sharing",
                f"host {host}: {len(same)} ranks use the same GPU {kind} {gpu_id}: {names}"
                + ("" if strong else " (identified by visible index only: ignore if Slurm binds one GPU per task)"),
                [int(r["rank"]) for r in same],
                "one rank per GPU: check --ntasks-per-node against --gpus-per-node, --gpu-bind, and "
                "cluster.visible_devices_var (LUMI: ROCR_VISIBLE_DEVICES=$SLURM_LOCALID)",
            ))
    return findings


def check_cpu_binding(records: Sequence[Mapping[str, Any]], *, cpus_per_task: Optional[int] = None) -> List[Finding]:
    """(3) Ranks of one host should not share CPUs, and each should have at least ``cpus_per_task`` of them."""
    findings = []
    for host, ranks in _by_host(records).items():
        if len(ranks) < 2:
            continue
        sets = [(r, parse_ints(r.get("cpus", ""))) for r in ranks]
        if all(s == sets[0][1] for _, s in sets):
            findings.append(Finding(
                "warn", "cpu_binding",
                f"host {host}: ranks {format_ints(r['rank'] for r in ranks)} all share the same "
                f"{len(sets[0][1])} CPU(s) {format_ints(sets[0][1])}: no per-rank CPU binding",
                [int(r["rank"]) for r in ranks],
                "bind each rank to its own cores (srun --cpu-bind, cluster.cpu_bind); expected with torchrun or "
                "on a laptop",
            ))
            continue
        pairs = []
        for i in range(len(sets)):
            for j in range(i + 1, len(sets)):
                common = sets[i][1] & sets[j][1]
                if common:
                    pairs.append((sets[i][0]["rank"], sets[j][0]["rank"], common))
        if pairs:
            shown = "; ".join(f"ranks {a} and {b} share CPU(s) {format_ints(c)}" for a, b, c in pairs[:4])
            more = f"; and {len(pairs) - 4} more pair(s)" if len(pairs) > 4 else ""
            findings.append(Finding("warn", "cpu_binding", f"host {host}: {shown}{more}",
                                    sorted({p[0] for p in pairs} | {p[1] for p in pairs}),
                                    "overlapping masks in cluster.cpu_bind"))
    if cpus_per_task and cpus_per_task > 1:
        few = [r for r in sorted(records, key=lambda r: r["rank"]) if int(r.get("n_cpus", 0)) < cpus_per_task]
        if few:
            shown = "; ".join(f"rank {r['rank']} on {r['host']}: {r.get('n_cpus')} ({r.get('cpus')})" for r in few[:4])
            more = f"; and {len(few) - 4} more" if len(few) > 4 else ""
            findings.append(Finding(
                "warn", "cpu_binding",
                f"{len(few)} rank(s) have fewer CPUs than cluster.cpus_per_task={cpus_per_task}: {shown}{more}",
                [int(r["rank"]) for r in few], "data loading and the host side of the step will be slow: check "
                "--cpus-per-task and --cpu-bind (srun inherits --cpus-per-task only through SRUN_CPUS_PER_TASK on "
                "recent Slurm)",
            ))
    return findings


def check_numa(records: Sequence[Mapping[str, Any]]) -> List[Finding]:
    """Information only: ranks whose CPUs are on other NUMA nodes than their GPU (not always avoidable)."""
    far = [r for r in records if r.get("numa_gpu") is not None and r.get("numa_cpu")
           and r["numa_gpu"] not in r["numa_cpu"]]
    if not far:
        return []
    detail = "; ".join(f"rank {r['rank']}: cpus on NUMA {format_ints(r['numa_cpu'])}, GPU on NUMA {r['numa_gpu']}"
                       for r in sorted(far, key=lambda r: r["rank"])[:4])
    return [Finding("info", "numa", f"{len(far)} rank(s) run far from their GPU: {detail}",
                    sorted(int(r["rank"]) for r in far), "LUMI: use the profile's cpu_bind masks")]


def check_records(records: Sequence[Mapping[str, Any]], *, world_size: int, require_device: bool,
                  device_name: Optional[str] = None, cpus_per_task: Optional[int] = None) -> List[Finding]:
    """All checks of phase 1 (before any collective runs on the devices)."""
    findings: List[Finding] = []
    if len(records) != world_size:
        findings.append(Finding("fail", "world", f"{len(records)} rank(s) reported, expected world_size={world_size}",
                                [], "the process group and the launcher disagree on the world size"))
    for r in sorted(records, key=lambda r: r["rank"]):
        if r.get("record_error"):
            findings.append(Finding("fail", "record", f"{_who(r)}: could not inspect itself: {r['record_error']}",
                                    [int(r["rank"])], "see this rank's log; the node may be broken"))
    findings += check_devices(records, require_device=require_device, device_name=device_name)
    findings += check_gpu_sharing(records)
    findings += check_cpu_binding(records, cpus_per_task=cpus_per_task)
    findings += check_numa(records)
    return findings


def bandwidth_summary(nbytes: int, times_s: Sequence[float], world_size: int) -> Dict[str, Any]:
    """Bus bandwidth from the slowest rank's time per all-reduce (GB/s = 1e9 bytes/s, as nccl-tests report)."""
    t = max(times_s) if times_s else 0.0
    if world_size < 2 or t <= 0:
        return {"bytes": nbytes, "time_s": t, "algbw_gbps": None, "busbw_gbps": None,
                "skipped": "single rank" if world_size < 2 else "no time measured"}
    algbw = nbytes / t / 1e9
    return {"bytes": nbytes, "time_s": t, "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (world_size - 1) / world_size}


def check_bandwidth(bandwidth: Mapping[str, Any], *, expected_busbw_gbps: Optional[float],
                    warn_fraction: float = WARN_BANDWIDTH_FRACTION,
                    fail_fraction: Optional[float] = None) -> List[Finding]:
    """(4) Measured bus bandwidth against the expectation.

    Warns below ``warn_fraction`` of it; fails below ``fail_fraction`` when one is given.
    """
    busbw = bandwidth.get("busbw_gbps")
    if busbw is None or not expected_busbw_gbps:
        return []
    fraction = busbw / expected_busbw_gbps
    text = (f"all-reduce bus bandwidth {busbw:.2f} GB/s is {fraction:.1%} of the expected {expected_busbw_gbps:g} GB/s "
            f"({_mib(int(bandwidth['bytes']))}, slowest rank {bandwidth['time_s'] * 1e3:.2f} ms)")
    hint = ("a slow link, a socket fallback (see transport), a bad node or noisy neighbours: compare with other jobs, "
            "and exclude the node (cluster.exclude_nodes) if it repeats")
    if fail_fraction is not None and fraction < fail_fraction:
        return [Finding("fail", "bandwidth", text + f" (below the failure threshold {fail_fraction:.0%})", [], hint)]
    if fraction < warn_fraction:
        return [Finding("warn", "bandwidth", text, [], hint)]
    return []


def check_transport(records: Sequence[Mapping[str, Any]], *, backend: str,
                    fail_on_socket: bool = False) -> Tuple[str, List[Finding]]:
    """(5) The transport each node's NCCL log shows; socket fallback between nodes is a loud warning (or a failure)."""
    if "nccl" not in backend:
        return "n/a", []
    hosts = _by_host(records)
    seen = {r["host"]: r.get("transport") for r in records if r.get("transport") not in (None, "unknown")}
    if not seen:
        level = "info"
        msg = ("transport not checked: no NCCL debug log (set NCCL_DEBUG=INFO and NCCL_DEBUG_FILE, or leave NCCL_DEBUG "
               "unset and pass run_dir so the preflight captures one)")
        return "unknown", ([Finding(level, "transport", msg)] if len(hosts) > 1 else [])
    order = {name: i for i, name in enumerate(TRANSPORTS)}  # slowest first
    overall = min(seen.values(), key=lambda t: order.get(t, len(order)))
    slow = sorted(h for h, t in seen.items() if t in SLOW_TRANSPORTS)
    if slow and len(hosts) > 1:
        ranks = sorted(int(r["rank"]) for r in records if r["host"] in slow)
        evidence = next((r.get("transport_evidence") for r in records if r["host"] in slow
                         and r.get("transport_evidence")), [])
        msg = (f"NCCL/RCCL FELL BACK TO TCP SOCKETS ({overall}) between nodes on host(s) {', '.join(slow[:8])}"
               f"{' ...' if len(slow) > 8 else ''}: inter-node collectives will run at a fraction of "
               f"InfiniBand/Slingshot speed" + (f"; log: {evidence[-1]}" if evidence else ""))
        hint = ("LUMI: the container needs the aws-ofi-rccl plugin (log must say 'Selected Provider is cxi'), "
                "NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3 and the /opt/cray and libcxi binds; Leonardo: NET/IB must "
                "find the mlx5 devices (check NCCL_IB_HCA, and that the container sees /dev/infiniband)")
        return overall, [Finding("fail" if fail_on_socket else "warn", "transport", msg, ranks, hint)]
    return overall, []


def decide(findings: Sequence[Finding]) -> bool:
    return not any(f.level == "fail" for f in findings)


# ---------------------------------------------------------------------------------------------------------------
# Output


def _limited(findings: Sequence[Finding], levels: Sequence[str]) -> List[str]:
    lines: List[str] = []
    per_check: Dict[Tuple[str, str], int] = {}
    hinted: set = set()
    for f in findings:
        if f.level not in levels:
            continue
        key = (f.level, f.check)
        per_check[key] = per_check.get(key, 0) + 1
        if per_check[key] == MAX_LINES_PER_CHECK + 1:
            total = sum(1 for g in findings if (g.level, g.check) == key)
            more = total - MAX_LINES_PER_CHECK
            lines.append(f"  {f.level.upper():4} {f.check}: ... and {more} more (preflight.json)")
        if per_check[key] > MAX_LINES_PER_CHECK:
            continue
        lines.append("  " + f.line())
        if f.hint and (f.check, f.hint) not in hinted:
            hinted.add((f.check, f.hint))
            lines.append(f"       hint: {f.hint}")
    return lines


def format_table(report: PreflightReport, max_rows: int = 256) -> str:
    """The rank-0 printout: a header, one line per rank (up to ``max_rows``), then the findings and the verdict."""
    rows = sorted(report.records, key=lambda r: r["rank"])
    named = {rank for f in report.findings if f.level in ("fail", "warn") for rank in f.ranks}
    if len(rows) > max_rows:
        keep = {r["rank"] for r in rows[:max_rows]} | named
        shown = [r for r in rows if r["rank"] in keep]
    else:
        shown = rows
    header = ("rank", "local", "host", "device", "gpu", "visible", "cpus", "numa", "net")
    table = [header]
    for r in shown:
        visible = r.get("visible") or {}
        vis = ",".join(f"{v.split('_')[0]}={visible[v]}" for v in VISIBLE_VARS if v in visible) or "-"
        gpu = "-"
        if r.get("gpu_name"):
            gpu = f"{r['gpu_name'][:24]} [{r.get('gpu_id_kind')} {r.get('gpu_id')}]"
        numa = format_ints(r.get("numa_cpu") or []) or "-"
        if r.get("numa_gpu") is not None:
            numa += f"/gpu {r['numa_gpu']}"
        table.append((str(r["rank"]), str(r["local_rank"]), str(r["host"])[:24], str(r.get("device")), gpu,
                      vis[:40], f"{r.get('cpus')} ({r.get('n_cpus')})"[:32], numa, str(r.get("transport") or "-")))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"preflight: {report.summary()}"]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if len(shown) < len(rows):
        lines.append(f"  ... {len(rows) - len(shown)} more rank(s) in preflight.json")
    lines += _limited(report.findings, ("fail", "warn", "info"))
    verdict = "PASSED" if report.ok else "FAILED"
    extra = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    lines.append(f"preflight: {verdict} in {report.elapsed_s:.2f}s{extra}"
                 + (f"; details in {report.json_path}" if report.json_path else ""))
    return "\n".join(lines)


def format_failure(report: PreflightReport) -> str:
    """The ``PreflightError`` message: identical on every rank."""
    failed = sorted({rank for f in report.failures for rank in f.ranks})
    who = f"on {len(failed)} of {report.world_size} rank(s)" if failed else f"({report.world_size} rank(s))"
    lines = [f"preflight failed {who}, {len(report.hosts)} host(s): training not started"]
    lines += _limited(report.findings, ("fail",))
    lines += _limited(report.findings, ("warn",))
    if report.json_path:
        lines.append(f"details: {report.json_path}")
    lines.append("to skip the preflight (not recommended): train.preflight=false")
    return "\n".join(lines)


def write_json(report: PreflightReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Collectives


class _Watchdog:
    """Ends the process with EXIT_PREFLIGHT if the preflight is not done in time (a collective blocks in C++)."""

    def __init__(self, timeout_s: Optional[float], rank: int) -> None:
        self.stage = "start"
        self.rank = rank
        self.timeout_s = timeout_s
        self._timer: Optional[threading.Timer] = None

    def __enter__(self) -> "_Watchdog":
        if self.timeout_s and self.timeout_s > 0:
            self._timer = threading.Timer(self.timeout_s, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        message = (f"preflight: [rank {self.rank} on {socket.gethostname()}] timed out after {self.timeout_s:g}s "
                   f"in stage '{self.stage}': a rank did not arrive or the network hangs; training not started "
                   f"(exit {EXIT_PREFLIGHT}). Check the other ranks' logs for the first error; with NCCL, "
                   "NCCL_DEBUG=INFO shows where it stops.\n")
        try:
            sys.stdout.flush()
            sys.stderr.write(message)
            sys.stderr.flush()
        finally:
            os._exit(EXIT_PREFLIGHT)


def _sync(torch: Any, device: Any) -> None:
    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def measure_allreduce(device: Any, *, group: Any = None, nbytes: Optional[int] = None,
                      warmup: Optional[int] = None, iters: Optional[int] = None) -> Dict[str, Any]:
    """One checked all-reduce, ``warmup`` untimed ones, then the mean time of ``iters`` on this rank."""
    import torch
    import torch.distributed as dist

    on_gpu = getattr(device, "type", None) == "cuda"
    nbytes = int(nbytes or (GPU_BYTES if on_gpu else CPU_BYTES))
    warmup = GPU_WARMUP if warmup is None and on_gpu else (CPU_WARMUP if warmup is None else warmup)
    iters = GPU_ITERS if iters is None and on_gpu else (CPU_ITERS if iters is None else iters)
    n = dist.get_world_size(group)
    me = dist.get_rank(group)
    numel = max(1, nbytes // 4)
    tensor = torch.full((numel,), float(me + 1), dtype=torch.float32, device=device)
    dist.all_reduce(tensor, group=group)
    _sync(torch, device)
    expected = n * (n + 1) / 2
    got = (float(tensor[0].item()), float(tensor[-1].item()))
    correct = got == (expected, expected)
    tensor.zero_()
    for _ in range(max(0, warmup)):
        dist.all_reduce(tensor, group=group)
    _sync(torch, device)
    start = time.perf_counter()
    for _ in range(max(1, iters)):
        dist.all_reduce(tensor, group=group)
    _sync(torch, device)
    elapsed = (time.perf_counter() - start) / max(1, iters)
    return {"bytes": numel * 4, "time_s": elapsed, "iters": max(1, iters), "correct": correct,
            "got": None if correct else list(got), "expected_sum": expected}


def _nccl_log_plan(backend: str, *, local_rank: int, run_dir: Optional[Path], nccl_log: Any,
                   capture: bool, environ: Any) -> Tuple[Optional[str], Dict[str, Optional[str]]]:
    """Which file to read this rank's NCCL debug output from; sets NCCL_DEBUG* when capturing (returns old values)."""
    if "nccl" not in backend:
        return None, {}
    if nccl_log:
        return expand_nccl_debug_file(str(nccl_log)), {}
    if environ.get("NCCL_DEBUG_FILE"):
        return expand_nccl_debug_file(environ["NCCL_DEBUG_FILE"]), {}
    if not capture or environ.get("NCCL_DEBUG") or local_rank != 0:
        return None, {}
    # NCCL reads these when it first logs (at the communicator's creation: the first collective, just below).
    # One file per node (local rank 0); it keeps the INIT/NET lines of later communicators too.
    folder = (Path(run_dir) / "preflight") if run_dir else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / "nccl-%h-%p.log")
    new = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET", "NCCL_DEBUG_FILE": pattern}
    old = {k: environ.get(k) for k in new}
    environ.update(new)
    return expand_nccl_debug_file(pattern), old


def _read_transport(path: Optional[str]) -> Tuple[Optional[str], List[str]]:
    if not path:
        return None, []
    try:
        with open(path, errors="replace") as fh:
            text = fh.read(4 * 2**20)
    except OSError:
        return None, []
    return detect_transport(text), transport_evidence(text)


def run_preflight(
    cfg: Any,
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    device: Any,
    group: Any = None,
    expected_busbw_gbps: Optional[float] = None,
    require_device: Optional[bool] = None,
    timeout_s: Optional[float] = 60,
    run_dir: Optional[os.PathLike | str] = None,
    min_busbw_fraction: Optional[float] = None,
    fail_on_socket_fallback: bool = False,
    nccl_log: Optional[os.PathLike | str] = None,
    capture_nccl_debug: bool = True,
    bandwidth_bytes: Optional[int] = None,
    print_table: bool = True,
    max_table_rows: int = 256,
) -> PreflightReport:
    """Check this allocation before training; every rank calls it, after ``init_process_group``.

    ``cfg``: the resolved config (dict or OmegaConf); reads ``cluster.device``, ``cluster.backend``,
    ``cluster.cpus_per_task`` and, when no ``expected_busbw_gbps`` is passed, ``cluster.expected_busbw_gbps`` if the
    profile has it (GB/s, nccl-tests' bus bandwidth). ``require_device``: None = a GPU is required unless
    ``cluster.device`` is ``cpu`` (or there is no cluster). ``min_busbw_fraction``: fail below this fraction of the
    expectation (default: only warn below 50%). ``fail_on_socket_fallback``: a multi-node job on TCP sockets fails
    instead of warning. ``nccl_log``: a file with this rank's NCCL_DEBUG=INFO output (``%h``/``%p`` allowed); without
    it NCCL_DEBUG_FILE is read, or, when NCCL_DEBUG is unset and ``capture_nccl_debug``, each node's local rank 0
    turns on NCCL INFO logging into ``<run_dir>/preflight/nccl-<host>-<pid>.log`` before its first collective.

    Returns the report (the same verdict on every rank); raises ``PreflightError`` on every rank when a check
    fails. Rank 0 prints the table and writes ``<run_dir>/preflight.json``. A process still inside after
    ``timeout_s`` seconds exits with ``EXIT_PREFLIGHT``.
    """
    t0 = time.perf_counter()
    import torch  # noqa: F401 - the job has it already; imported here to keep this module's import light
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed and world_size > 1:
        raise PreflightError(f"preflight: world_size={world_size} but torch.distributed is not initialized "
                             "(call run_preflight after init_process_group)")
    backend = str(dist.get_backend(group)) if distributed else "none"
    is_decider = (dist.get_rank(group) == 0) if distributed else True
    src = (dist.get_global_rank(group, 0) if group is not None else 0) if distributed else 0
    cluster_device = _cfg_get(cfg, "cluster", "device")
    if require_device is None:
        require_device = cluster_device not in (None, "cpu")
    cpus_per_task = _cfg_get(cfg, "cluster", "cpus_per_task")
    if expected_busbw_gbps is None:
        expected_busbw_gbps = _cfg_get(cfg, "cluster", "expected_busbw_gbps")
    run_dir_path = Path(run_dir) if run_dir else None
    json_path = str(run_dir_path / "preflight.json") if run_dir_path else None

    def gather(obj: Any) -> List[Any]:
        if not distributed:
            return [obj]
        out: List[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def broadcast(obj: Any) -> Any:
        if not distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def finish(records: List[Dict[str, Any]], findings: List[Finding], bandwidth: Dict[str, Any],
               transport: str) -> PreflightReport:
        report = PreflightReport(
            ok=decide(findings), world_size=len(records), hosts=sorted({r["host"] for r in records}),
            findings=findings, records=sorted(records, key=lambda r: r["rank"]), bandwidth=bandwidth,
            transport=transport, backend=backend, elapsed_s=time.perf_counter() - t0, json_path=json_path,
        )
        return report

    def publish(report: PreflightReport) -> None:
        if not is_decider:
            return
        if json_path:
            try:
                write_json(report, Path(json_path))
            except OSError as e:
                report.findings.append(Finding("warn", "report", f"could not write {json_path}: {e}"))
        if print_table:
            print(format_table(report, max_rows=max_table_rows), flush=True)
            slow = [f for f in report.findings if f.check == "transport" and f.level in ("warn", "fail")]
            for f in slow:
                print(f"\n!!! preflight: {f.message}\n!!! {f.hint}\n", file=sys.stderr, flush=True)

    with _Watchdog(timeout_s, rank) as watchdog:
        log_path, restore_env = _nccl_log_plan(backend, local_rank=local_rank, run_dir=run_dir_path,
                                               nccl_log=nccl_log, capture=capture_nccl_debug, environ=os.environ)
        try:
            watchdog.stage = "collect records"
            try:
                record = collect_record(rank, local_rank, device)
            except Exception as e:  # noqa: BLE001 - still join the gather, so every rank hears about it
                record = {"rank": int(rank), "local_rank": int(local_rank), "host": socket.gethostname(),
                          "device": str(device), "device_type": getattr(device, "type", str(device)),
                          "record_error": f"{type(e).__name__}: {e}"}
            if getattr(device, "type", None) == "cuda":  # the attention kernels the memory plan assumed (never raises)
                from launcher.train.attention_probe import probe_attention

                watchdog.stage = "attention probe"
                probe = probe_attention(device, _cfg_get(cfg, "model"))
                record["attention"] = probe.to_dict() if probe else None
            watchdog.stage = "all_gather_object of the records (first collective)"
            records = gather(record)
            watchdog.stage = "broadcast of the device checks"
            phase1: Dict[str, Any] = {}
            if is_decider:
                found = check_records(records, world_size=world_size, require_device=bool(require_device),
                                      device_name=cluster_device, cpus_per_task=cpus_per_task)
                if any(r.get("attention") for r in records):
                    from launcher.train.attention_probe import planner_assumes_flash, record_findings

                    found += [Finding(**f) for f in record_findings(
                        records, planner_assumes_flash=planner_assumes_flash(cluster_device))]
                phase1 = {"findings": [asdict(f) for f in found]}
            phase1 = broadcast(phase1)
            findings = [Finding(**f) for f in phase1["findings"]]
            if not decide(findings):
                # Stop before any collective touches a missing or shared device.
                report = finish(records, findings, {"skipped": "a device check failed"}, "not checked")
                publish(report)
                raise PreflightError(format_failure(report), report)

            watchdog.stage = "all-reduce bandwidth test"
            if distributed and dist.get_world_size(group) > 1:
                measured = measure_allreduce(device, group=group, nbytes=bandwidth_bytes)
            else:
                measured = {"bytes": 0, "time_s": 0.0, "correct": True}
            transport, evidence = _read_transport(log_path)
            watchdog.stage = "all_gather_object of the measurements"
            mine = {"time_s": measured["time_s"], "correct": measured["correct"], "got": measured.get("got"),
                    "transport": transport, "transport_evidence": evidence, "nccl_log": log_path}
            measurements = gather(mine)
            for r, m in zip(records, measurements):
                r.update(m)
            watchdog.stage = "broadcast of the verdict"
            phase2: Dict[str, Any] = {}
            if is_decider:
                more: List[Finding] = []
                wrong = [r for r in records if not r.get("correct", True)]
                for r in wrong:
                    more.append(Finding("fail", "allreduce",
                                        f"{_who(r)}: all-reduce returned {r.get('got')}, expected "
                                        f"{measured.get('expected_sum')}", [int(r["rank"])],
                                        "the transport corrupts data: exclude the node and report it"))
                bandwidth = bandwidth_summary(int(measured["bytes"]), [float(r["time_s"]) for r in records],
                                              len(records))
                bandwidth["expected_busbw_gbps"] = expected_busbw_gbps
                more += check_bandwidth(bandwidth, expected_busbw_gbps=expected_busbw_gbps,
                                        fail_fraction=min_busbw_fraction)
                overall, transport_findings = check_transport(records, backend=backend,
                                                              fail_on_socket=fail_on_socket_fallback)
                phase2 = {"findings": [asdict(f) for f in more + transport_findings],
                          "bandwidth": bandwidth, "transport": overall}
            phase2 = broadcast(phase2)
        finally:
            for key, value in restore_env.items():  # NCCL has read them; child processes need not inherit them
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        findings += [Finding(**f) for f in phase2["findings"]]
        report = finish(records, findings, phase2["bandwidth"], phase2["transport"])
        publish(report)
    if not report.ok:
        raise PreflightError(format_failure(report), report)
    return report
