"""Who this process is, from the environment alone (torchrun's or Slurm's variables): pure functions, no torch.

Computed before the GPU runtime starts, because the device selection (LUMI: ROCR_VISIBLE_DEVICES per task) must be
in the environment before HIP/CUDA initialises. Unit-tested without processes.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional, Tuple

from launcher.rundir import master_port


@dataclass(frozen=True)
class Topology:
    """Who this process is, from the environment only (no torch): computed before the GPU runtime starts."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"



def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``nid[005001-005004,005010],x1`` -> ``nid005001``.

    Handles the compressed forms Slurm prints for one prefix with a bracketed range; ``scontrol show hostnames`` is
    preferred when it exists (see ``slurm_master_addr``).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM_JOB_NODELIST")
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    assert match is not None  # the pattern matches any string
    prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def slurm_master_addr(nodelist: str) -> str:
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return first_host(nodelist)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def topology_from_env(environ: Mapping[str, str]) -> Topology:
    """Rank, local rank, world size and rendezvous address from torchrun's or Slurm's variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return Topology(
            rank=int(environ["RANK"]),
            local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])),
            world_size=int(environ["WORLD_SIZE"]),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", "29500")),
            source="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        addr = environ.get("MASTER_ADDR") or slurm_master_addr(environ.get("SLURM_JOB_NODELIST", ""))
        port = environ.get("MASTER_PORT") or str(master_port(environ.get("SLURM_JOB_ID", "0")))
        return Topology(
            rank=int(environ["SLURM_PROCID"]),
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            world_size=int(environ["SLURM_NTASKS"]),
            master_addr=addr,
            master_port=int(port),
            source="slurm",
        )
    return Topology(0, 0, 1, "127.0.0.1", int(environ.get("MASTER_PORT") or _free_port()), "single")


def export_topology(topo: Topology, environ: MutableMapping[str, str], *, single_device: bool = False) -> None:
    """Make the env:// rendezvous (and DeepSpeed, which reads the same variables) see this topology.

    ``single_device``: this process sees exactly one GPU (LUMI's one GCD per task through ROCR_VISIBLE_DEVICES).
    DeepSpeed's engine and ``zero.Init`` call ``set_device(LOCAL_RANK)``, so LOCAL_RANK must then be 0, the only
    ordinal that exists; the node-local rank itself stays in ``LAUNCHER_LOCAL_RANK`` (and SLURM_LOCALID).
    """
    environ["RANK"] = str(topo.rank)
    environ["LOCAL_RANK"] = "0" if single_device else str(topo.local_rank)
    environ["LAUNCHER_LOCAL_RANK"] = str(topo.local_rank)
    environ["WORLD_SIZE"] = str(topo.world_size)
    if "LOCAL_WORLD_SIZE" not in environ:
        per_node = tasks_on_this_node(environ) if topo.source == "slurm" else None
        environ["LOCAL_WORLD_SIZE"] = str(per_node or topo.world_size)
    environ["MASTER_ADDR"] = topo.master_addr
    environ["MASTER_PORT"] = str(topo.master_port)


def tasks_on_this_node(environ: Mapping[str, str]) -> Optional[int]:
    """Slurm tasks on this node: ``SLURM_NTASKS_PER_NODE`` when the job asked for it, else this node's entry of
    ``SLURM_TASKS_PER_NODE`` (always set; compressed as ``8(x2),4``, indexed by ``SLURM_NODEID``)."""
    explicit = re.match(r"\d+", environ.get("SLURM_NTASKS_PER_NODE", ""))
    if explicit:
        return int(explicit.group(0))
    counts: list = []
    for part in environ.get("SLURM_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(environ.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else None


def select_visible_device(visible_devices_var: Optional[str], local_rank: int,
                          environ: MutableMapping[str, str]) -> bool:
    """Set ``visible_devices_var`` (the profile's ``cluster.visible_devices_var`` (LUMI: ROCR_VISIBLE_DEVICES) to the local rank before the GPU runtime starts.

    Returns True when this process now sees exactly one device (so it uses device 0). ``CUDA_VISIBLE_DEVICES`` that
    Slurm set for its own binding is never overwritten.
    """
    var = visible_devices_var
    if not var:
        return False
    if var == "CUDA_VISIBLE_DEVICES" and "CUDA_VISIBLE_DEVICES" in environ and "SLURM_JOB_ID" in environ:
        # Slurm bound the devices itself (--gpus-per-task / --gpu-bind): fighting it breaks the binding.
        return "," not in environ["CUDA_VISIBLE_DEVICES"]
    current = environ.get(var)
    if current and "," in current:
        # A list (e.g. all GCDs of the node): pick ours from it.
        devices = current.split(",")
        environ[var] = devices[local_rank % len(devices)]
    elif not current:
        environ[var] = str(local_rank)
    return True




def prepare_environment(visible_devices_var: Optional[str], environ: MutableMapping[str, str]) -> Tuple[Topology, bool]:
    """Topology, device selection and the variables torch and DeepSpeed read, before any GPU runtime starts (pure)."""
    topo = topology_from_env(environ)
    single_device = select_visible_device(visible_devices_var, topo.local_rank, environ)
    export_topology(topo, environ, single_device=single_device)
    return topo, single_device
