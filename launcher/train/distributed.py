"""The process group: rendezvous from the environment, this rank's device, one timeout for every group, and the log line.

Two ways in, one result (a ``DistEnv``): torchrun (local runs) or srun (Slurm, one task per device); the variables
are read by ``launcher.train.topology``. A plain ``python -m launcher.train RUN_DIR`` is a world of one.

This module is the job's one import for distributed work: it also re-exports the small collectives
(``launcher.train.collectives``) and the stop flag (``launcher.train.stop``), so call sites say ``D.barrier()`` or
``D.stop_requested()`` whichever module defines them.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, MutableMapping, Optional

from launcher.train.collectives import (  # noqa: F401  (re-exported)
    AgreeingBarrier, LaggedAgreement, PeerFailed, all_reduce_max, barrier, broadcast_object, run_together,
)
from launcher.train.stop import (  # noqa: F401  (re-exported)
    STOP_SIGNALS, clear_stop, install_signal_handlers, request_stop, stop_reason, stop_requested,
)
from launcher.config.schema import ClusterConfig
from launcher.rundir import ENV_JOB_END, ENV_SIGNAL_LEAD_S
from launcher.train.topology import prepare_environment

# Rendezvous (and the first collective) must fail instead of burning the allocation: 10 minutes.
INIT_TIMEOUT_S = float(os.environ.get("LAUNCHER_DIST_INIT_TIMEOUT_S", 600))
# Later collectives wait for rank 0 writing a consolidated export or checkpoint: allow longer where torch lets us.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("LAUNCHER_DIST_TIMEOUT_S", 1800))
# Close to the time limit a collective still gets this long (a save's barrier, a slow first all-reduce).
MIN_COLLECTIVE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: Any  # torch.device
    source: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type



def process_group_backend(device_backend: str, device_type: str, *, cpu_collectives: bool) -> str:
    """The ``init_process_group`` backend string.

    ``cpu_collectives``: some collectives run on CPU tensors although the device is a GPU (FSDP2 with CPU offload
    reduces the gradient norm over CPU DTensors); a NCCL-only group fails there ("No backend type associated with
    device type cpu"), so CPU tensors get gloo beside it.
    """
    if device_type == "cuda" and cpu_collectives and device_backend != "gloo":
        return f"cuda:{device_backend},cpu:gloo"
    return device_backend


def setup(
    cluster: Optional[ClusterConfig] = None,
    *,
    environ: Optional[MutableMapping[str, str]] = None,
    cpu_collectives: bool = False,
) -> DistEnv:
    """Initialise torch.distributed from the environment and pick this rank's device."""
    environ = os.environ if environ is None else environ
    topo, single_device = prepare_environment(cluster.visible_devices_var if cluster else None, environ)

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would warn that it fell back to CPU
    if torch.cuda.is_available():
        index = 0 if single_device else topo.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    backend = (cluster.backend if cluster else None) or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        var = (cluster.visible_devices_var if cluster else None) or "CUDA_VISIBLE_DEVICES"
        raise RuntimeError(
            f"cluster.backend=nccl but this process sees no GPU (rank {topo.rank}, local rank {topo.local_rank}, "
            f"{var}={environ.get(var)!r}); check the job's GPU request and binding, or use cluster.backend=gloo on "
            "CPU nodes"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend=process_group_backend(backend, device.type, cpu_collectives=cpu_collectives),
            init_method="env://",
            rank=topo.rank,
            world_size=topo.world_size,
            timeout=timedelta(seconds=min(INIT_TIMEOUT_S, collective_timeout_s())),
        )
        _extend_collective_timeout(dist)
    return DistEnv(topo.rank, topo.local_rank, topo.world_size, backend, device, topo.source)


def _extend_collective_timeout(dist: Any) -> None:
    """One timeout for every process group: the world group's, and the groups created later (DeepSpeed clones the
    world group, FSDP's device mesh and DeepSpeed's data-parallel groups call ``new_group``), which would otherwise
    get torch's default instead of ours."""
    from torch.distributed import distributed_c10d as c10d

    seconds = collective_timeout_s()
    timeout = timedelta(seconds=seconds)
    # new_group(timeout=None) reads these module globals (torch's _get_default_timeout).
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    if seconds == INIT_TIMEOUT_S:
        return
    setter = getattr(c10d, "_set_pg_timeout", None)
    if setter is None:
        return
    try:
        setter(timeout)
    except Exception:  # private API: keep the init timeout if this torch refuses
        pass


def collective_timeout_s(environ: Optional[Mapping[str, str]] = None, now: Optional[float] = None) -> float:
    """The timeout every process group of this job gets (seconds): ``LAUNCHER_DIST_TIMEOUT_S`` (30 min), but never
    past the job's end (``LAUNCHER_JOB_END_EPOCH``, from the batch script) minus Slurm's warning lead, so a stuck
    collective aborts, and NCCL dumps its flight recorder, while the job can still write it down."""
    env = os.environ if environ is None else environ
    timeout = max(COLLECTIVE_TIMEOUT_S, INIT_TIMEOUT_S)
    end = float(env.get(ENV_JOB_END, "") or 0)
    now = time.time() if now is None else now
    if end > now:  # 0 or in the past: unknown (no time limit, or a clock that disagrees)
        left = end - now - float(env.get(ENV_SIGNAL_LEAD_S, "") or 0)
        timeout = min(timeout, max(MIN_COLLECTIVE_TIMEOUT_S, left))
    return timeout


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()



def log(message: str, *, env: Optional[DistEnv] = None, all_ranks: bool = False) -> None:
    """One line on stdout (rank 0 only unless ``all_ranks``), flushed so Slurm logs stay in order."""
    rank = env.rank if env is not None else int(os.environ.get("RANK", "0"))
    if rank == 0 or all_ranks:
        prefix = f"[rank {rank}] " if all_ranks else ""
        print(f"train: {prefix}{message}", flush=True, file=sys.stdout)
