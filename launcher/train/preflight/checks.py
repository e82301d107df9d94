"""Pure checks on the gathered records: devices, GPU sharing, CPU binding, NUMA, the all-reduce and its bandwidth.

Rank 0 runs them; tests feed fabricated records. Stdlib only.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from launcher.train.preflight.records import VISIBLE_VARS, format_ints, parse_ints
from launcher.train.preflight.report import Finding, mib

# Bus bandwidth below this fraction of the expectation warns.
WARN_BANDWIDTH_FRACTION = 0.5

Record = Mapping[str, Any]


def who(r: Record) -> str:
    """``rank 3 (host nid005001, local rank 3)``."""
    return f"rank {r['rank']} (host {r['host']}, local rank {r['local_rank']})"


def _saw(r: Record) -> str:
    visible = r.get("visible") or {}
    shown = [f"{v}={visible[v]!r}" for v in VISIBLE_VARS if v in visible]
    unset = [v for v in VISIBLE_VARS[:3] if v not in visible]
    parts = [f"torch.cuda.device_count()={r.get('gpu_count', 0)}"] + shown
    if unset:
        parts.append("/".join(unset) + " unset")
    parts.append(f"running on {r.get('device', '?')}")
    return ", ".join(parts)


def by_host(records: Sequence[Record]) -> Dict[str, List[Record]]:
    """Host -> its records, by rank."""
    hosts: Dict[str, List[Record]] = {}
    for r in sorted(records, key=lambda r: r["rank"]):
        hosts.setdefault(r["host"], []).append(r)
    return hosts


def _device_problem(r: Record, need: str) -> Optional[Finding]:
    if r.get("gpu_count", 0) < 1:
        return Finding(
            "fail", "device", f"{who(r)}: no GPU visible ({need}): {_saw(r)}", [r["rank"]],
            "check the job's GPU request (--gpus-per-node / --gpus-per-task), cluster.visible_devices_var and "
            "the container's GPU access (--nv on Leonardo, the ROCm binds on LUMI); for a CPU run set "
            "cluster.device=cpu and cluster.backend=gloo",
        )
    if r.get("device_type") != "cuda":
        return Finding("fail", "device", f"{who(r)}: sees {r['gpu_count']} GPU(s) but runs on {r.get('device')} "
                       f"({need})", [r["rank"]], "the job must pick cuda:<local index> before init_process_group")
    if r.get("gpu_error"):
        return Finding("fail", "device", f"{who(r)}: GPU properties failed: {r['gpu_error']}", [r["rank"]],
                       "the driver or the device is broken: exclude the node")
    return None


def check_devices(records: Sequence[Record], *, require_device: bool,
                  device_name: Optional[str] = None) -> List[Finding]:
    """(1) Every rank sees a GPU and runs on it when one is required; all ranks use the same kind of device."""
    findings = []
    need = f"cluster.device={device_name} needs one" if device_name else "a GPU is required"
    if require_device:
        found = (_device_problem(r, need) for r in sorted(records, key=lambda r: r["rank"]))
        findings += [f for f in found if f is not None]
    kinds: Dict[str, List[int]] = {}
    for r in records:
        kinds.setdefault(str(r.get("device_type")), []).append(int(r["rank"]))
    if len(kinds) > 1:
        spread = "; ".join(f"{kind} on ranks {format_ints(ranks)}" for kind, ranks in sorted(kinds.items()))
        findings.append(Finding("fail", "device", f"ranks run on different kinds of device: {spread}",
                                sorted(r["rank"] for r in records),
                                "every rank must run on the same kind of device"))
    return findings


def check_gpu_sharing(records: Sequence[Record]) -> List[Finding]:
    """(2) No two ranks of one host on the same physical GPU.

    Identified by PCI bus id or UUID: a duplicate fails. When only the visible index is known (cgroups may make every
    task see its own GPU as "0"), a duplicate is a warning.
    """
    findings = []
    for host, ranks in by_host(records).items():
        groups: Dict[Tuple[str, str], List[Record]] = {}
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


def _shared_cpus(host: str, ranks: Sequence[Record]) -> Optional[Finding]:
    """Ranks of one host with the same CPU set (no binding) or overlapping ones."""
    sets = [(r, parse_ints(r.get("cpus", ""))) for r in ranks]
    if all(s == sets[0][1] for _, s in sets):
        return Finding(
            "warn", "cpu_binding",
            f"host {host}: ranks {format_ints(r['rank'] for r in ranks)} all share the same "
            f"{len(sets[0][1])} CPU(s) {format_ints(sets[0][1])}: no per-rank CPU binding",
            [int(r["rank"]) for r in ranks],
            "bind each rank to its own cores (srun --cpu-bind, cluster.cpu_bind); expected with torchrun or "
            "on a laptop",
        )
    pairs = [(a[0]["rank"], b[0]["rank"], a[1] & b[1]) for i, a in enumerate(sets) for b in sets[i + 1:]
             if a[1] & b[1]]
    if not pairs:
        return None
    shown = "; ".join(f"ranks {a} and {b} share CPU(s) {format_ints(c)}" for a, b, c in pairs[:4])
    more = f"; and {len(pairs) - 4} more pair(s)" if len(pairs) > 4 else ""
    return Finding("warn", "cpu_binding", f"host {host}: {shown}{more}",
                   sorted({p[0] for p in pairs} | {p[1] for p in pairs}), "overlapping masks in cluster.cpu_bind")


def check_cpu_binding(records: Sequence[Record], *, cpus_per_task: Optional[int] = None) -> List[Finding]:
    """(3) Ranks of one host should not share CPUs, and each should have at least ``cpus_per_task`` of them."""
    shared = (_shared_cpus(host, ranks) for host, ranks in by_host(records).items() if len(ranks) > 1)
    findings = [f for f in shared if f is not None]
    if not cpus_per_task or cpus_per_task <= 1:
        return findings
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


def check_numa(records: Sequence[Record]) -> List[Finding]:
    """Information only: ranks whose CPUs are on other NUMA nodes than their GPU (not always avoidable)."""
    far = [r for r in records if r.get("numa_gpu") is not None and r.get("numa_cpu")
           and r["numa_gpu"] not in r["numa_cpu"]]
    if not far:
        return []
    detail = "; ".join(f"rank {r['rank']}: cpus on NUMA {format_ints(r['numa_cpu'])}, GPU on NUMA {r['numa_gpu']}"
                       for r in sorted(far, key=lambda r: r["rank"])[:4])
    return [Finding("info", "numa", f"{len(far)} rank(s) run far from their GPU: {detail}",
                    sorted(int(r["rank"]) for r in far), "LUMI: use the profile's cpu_bind masks")]


def check_records(records: Sequence[Record], *, world_size: int, require_device: bool,
                  device_name: Optional[str] = None, cpus_per_task: Optional[int] = None) -> List[Finding]:
    """All checks of phase 1 (before any collective runs on the devices)."""
    findings: List[Finding] = []
    if len(records) != world_size:
        findings.append(Finding("fail", "world", f"{len(records)} rank(s) reported, expected world_size={world_size}",
                                [], "the process group and the launcher disagree on the world size"))
    for r in sorted(records, key=lambda r: r["rank"]):
        if r.get("record_error"):
            findings.append(Finding("fail", "record", f"{who(r)}: could not inspect itself: {r['record_error']}",
                                    [int(r["rank"])], "see this rank's log; the node may be broken"))
    findings += check_devices(records, require_device=require_device, device_name=device_name)
    findings += check_gpu_sharing(records)
    findings += check_cpu_binding(records, cpus_per_task=cpus_per_task)
    findings += check_numa(records)
    return findings


def check_allreduce(records: Sequence[Record], expected_sum: Any) -> List[Finding]:
    """(4a) Every rank's checked all-reduce returned the right sum (``record["correct"]``)."""
    return [Finding("fail", "allreduce", f"{who(r)}: all-reduce returned {r.get('got')}, expected {expected_sum}",
                    [int(r["rank"])], "the transport corrupts data: exclude the node and report it")
            for r in records if not r.get("correct", True)]


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
    """(4b) Measured bus bandwidth against the expectation.

    Warns below ``warn_fraction`` of it; fails below ``fail_fraction`` when one is given.
    """
    busbw = bandwidth.get("busbw_gbps")
    if busbw is None or not expected_busbw_gbps:
        return []
    fraction = busbw / expected_busbw_gbps
    text = (f"all-reduce bus bandwidth {busbw:.2f} GB/s is {fraction:.1%} of the expected {expected_busbw_gbps:g} GB/s "
            f"({mib(int(bandwidth['bytes']))}, slowest rank {bandwidth['time_s'] * 1e3:.2f} ms)")
    hint = ("a slow link, a socket fallback (see transport), a bad node or noisy neighbours: compare with other jobs, "
            "and exclude the node (cluster.exclude_nodes) if it repeats")
    if fail_fraction is not None and fraction < fail_fraction:
        return [Finding("fail", "bandwidth", text + f" (below the failure threshold {fail_fraction:.0%})", [], hint)]
    if fraction < warn_fraction:
        return [Finding("warn", "bandwidth", text, [], hint)]
    return []
