"""Rendezvous, device selection and the stop flag.

Two ways in, one result (a ``DistEnv``):

- torchrun (local runs): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set.
- srun (Slurm, one task per device): ``RANK = SLURM_PROCID``, ``LOCAL_RANK = SLURM_LOCALID``,
  ``WORLD_SIZE = SLURM_NTASKS``. ``MASTER_ADDR``/``MASTER_PORT`` come from the batch script (computed outside the
  container, where ``scontrol`` exists); when absent, the first host of ``SLURM_JOB_NODELIST`` and
  ``launcher.rundir.master_port`` (the batch script's rule).

A plain ``python -m launcher.train RUN_DIR`` is a world of one.

The stop flag: ``request_stop()`` (or SIGTERM / SIGUSR2 once ``install_signal_handlers()`` ran) only sets a flag; the
training loop agrees on it across ranks at the next step boundary (``any_rank_flags``), all ranks save together and
``run()`` returns ``launcher.rundir.EXIT_REQUEUE``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Any, Callable, Dict, Mapping, MutableMapping, Optional, Sequence, Tuple

from launcher.rundir import master_port

# Rendezvous (and the first collective) must fail instead of burning the allocation: 10 minutes.
INIT_TIMEOUT_S = float(os.environ.get("LAUNCHER_DIST_INIT_TIMEOUT_S", 600))
# Later collectives wait for rank 0 writing a consolidated export or checkpoint: allow longer where torch lets us.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("LAUNCHER_DIST_TIMEOUT_S", 1800))

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


@dataclass(frozen=True)
class Topology:
    """Who this process is, from the environment only (no torch): computed before the GPU runtime starts."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


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


# ---------------------------------------------------------------------------------------------------------------
# Topology from the environment (pure functions, unit-tested without processes)


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
        per_node = re.match(r"\d+", environ.get("SLURM_NTASKS_PER_NODE", "")) if topo.source == "slurm" else None
        environ["LOCAL_WORLD_SIZE"] = per_node.group(0) if per_node else str(topo.world_size)
    environ["MASTER_ADDR"] = topo.master_addr
    environ["MASTER_PORT"] = str(topo.master_port)


def select_visible_device(
    cluster: Optional[Mapping[str, Any]], local_rank: int, environ: MutableMapping[str, str]
) -> bool:
    """Set ``cluster.visible_devices_var`` (LUMI: ROCR_VISIBLE_DEVICES) to the local rank before the GPU runtime starts.

    Returns True when this process now sees exactly one device (so it uses device 0). ``CUDA_VISIBLE_DEVICES`` that
    Slurm set for its own binding is never overwritten.
    """
    var = (cluster or {}).get("visible_devices_var")
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


# ---------------------------------------------------------------------------------------------------------------
# Process group


def prepare_environment(
    cluster: Optional[Mapping[str, Any]], environ: MutableMapping[str, str]
) -> Tuple[Topology, bool]:
    """Topology, device selection and the variables torch and DeepSpeed read, before any GPU runtime starts (pure)."""
    topo = topology_from_env(environ)
    single_device = select_visible_device(cluster, topo.local_rank, environ)
    export_topology(topo, environ, single_device=single_device)
    return topo, single_device


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
    cluster: Optional[Mapping[str, Any]] = None,
    *,
    environ: Optional[MutableMapping[str, str]] = None,
    cpu_collectives: bool = False,
) -> DistEnv:
    """Initialise torch.distributed from the environment and pick this rank's device."""
    environ = os.environ if environ is None else environ
    topo, single_device = prepare_environment(cluster, environ)

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
    backend = (cluster or {}).get("backend") or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        var = (cluster or {}).get("visible_devices_var") or "CUDA_VISIBLE_DEVICES"
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
            timeout=timedelta(seconds=INIT_TIMEOUT_S),
        )
        _extend_collective_timeout(dist)
    return DistEnv(topo.rank, topo.local_rank, topo.world_size, backend, device, topo.source)


def _extend_collective_timeout(dist: Any) -> None:
    """One timeout for every process group: the world group's, and the groups created later (DeepSpeed clones the
    world group, FSDP's device mesh and DeepSpeed's data-parallel groups call ``new_group``), which would otherwise
    get torch's default instead of ours."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=max(COLLECTIVE_TIMEOUT_S, INIT_TIMEOUT_S))
    # new_group(timeout=None) reads these module globals (torch's _get_default_timeout).
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    if COLLECTIVE_TIMEOUT_S <= INIT_TIMEOUT_S:
        return
    setter = getattr(c10d, "_set_pg_timeout", None)
    if setter is None:
        return
    try:
        setter(timeout)
    except Exception:  # private API: keep the init timeout if this torch refuses
        pass


def collective_timeout_s() -> float:
    """The timeout every process group of this job gets (seconds)."""
    return max(COLLECTIVE_TIMEOUT_S, INIT_TIMEOUT_S)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (decisions taken by rank 0: which checkpoint, for example)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_max(values: Sequence[float], device: Any) -> list:
    """Element-wise maximum over ranks (one small collective)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class LaggedAgreement:
    """Element-wise MAX over ranks of a few flags, answered one step later, without stalling the device.

    ``post(values)`` at the end of step k starts an asynchronous all-reduce; ``collect()`` at the end of step k+1
    returns its result. Gloo runs it in its own thread; on GPUs the collective and the copy of its result into pinned
    host memory queue behind step k, and ``collect`` waits only for those (step k+1 keeps the GPU busy meanwhile).
    Every rank must call both once per step, in the same order. The buffers (and the GPU event) are allocated once and
    reused: ``post`` needs the previous result collected.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self._pending: Optional[Any] = None  # the gloo work, or True while a GPU copy is in flight
        self._host: Any = None  # CPU: the reduced tensor itself; GPU: the pinned staging and result buffers
        self._stage: Any = None
        self._buffer: Any = None  # GPU: the device tensor that is reduced
        self._event: Any = None

    def _allocate(self, size: int) -> None:
        import torch

        if self.device.type == "cuda":
            self._stage = torch.zeros(size, dtype=torch.float32, pin_memory=True)
            self._host = torch.zeros(size, dtype=torch.float32, pin_memory=True)
            self._buffer = torch.zeros(size, dtype=torch.float32, device=self.device)
            self._event = torch.cuda.Event()
        else:
            self._host = torch.zeros(size, dtype=torch.float32)

    def post(self, values: Sequence[float]) -> None:
        import torch.distributed as dist

        if self._pending is not None:
            raise RuntimeError("LaggedAgreement.post: collect() the previous result first")
        if self._host is None or self._host.numel() != len(values):
            self._allocate(len(values))
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if self.device.type == "cuda":
            self._stage.numpy()[:] = values  # the previous copy out of it finished before its result was collected
            self._buffer.copy_(self._stage, non_blocking=True)
            if distributed:
                dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, async_op=True).wait()  # stream-ordered
            self._host.copy_(self._buffer, non_blocking=True)
            self._event.record()
            self._pending = True
            return
        self._host.numpy()[:] = values
        self._pending = dist.all_reduce(self._host, op=dist.ReduceOp.MAX, async_op=True) if distributed else True

    def collect(self) -> Optional[list]:
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        if pending is not True:
            pending.wait()
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class PeerFailed(RuntimeError):
    """Another rank failed during a phase where the ranks wait for each other (its own error says why)."""


class AgreeingBarrier:
    """A barrier that also carries "I failed": the phases where rank 0 works alone (tokenizer training, tokenizing)
    end in a barrier; if rank 0 raises before reaching it, ``fail()`` releases the others with ``PeerFailed``
    instead of leaving them in the barrier until the collective timeout (NCCL would wait there for 30 minutes).

    With ``flag`` (a path on the shared file system), the other ranks first wait for rank 0 to drop that file, with no
    time limit, and only then enter the collective: tokenizing a large corpus can take longer than any collective
    timeout, which would otherwise kill the job while rank 0 is still working."""

    POLL_S = 2.0

    def __init__(self, device: Any, what: str, flag: Optional[Path] = None) -> None:
        self.device = device
        self.what = what
        self.flag = flag
        self.called = False

    def __call__(self) -> None:
        self.called = True
        self._signal_or_wait()
        if all_reduce_max([0.0], self.device)[0] > 0:
            raise PeerFailed(f"another rank failed while {self.what} (its error is above)")

    def fail(self) -> None:
        if not self.called:
            self.called = True
            self._signal_or_wait()
            all_reduce_max([1.0], self.device)

    def _signal_or_wait(self) -> None:
        if self.flag is None:
            return
        if _rank() == 0:
            self.flag.parent.mkdir(parents=True, exist_ok=True)
            self.flag.touch()
            return
        started = time.monotonic()
        while not self.flag.exists():
            time.sleep(self.POLL_S)
            waited = time.monotonic() - started
            if int(waited) % 600 < self.POLL_S:
                log(f"still waiting for rank 0 ({self.what}): {waited / 60:.0f} min")


def run_together(fn: Callable[[AgreeingBarrier], Any], device: Any, what: str, flag_dir: Optional[Path] = None) -> Any:
    """``fn(barrier)`` where every rank calls ``barrier()`` once; a rank that raises first releases the others.

    ``flag_dir``: a shared directory where rank 0 signals the end of its lone work (see AgreeingBarrier)."""
    flag = None
    if flag_dir is not None:
        # A fresh name per phase and attempt, agreed on by all ranks, so a stale file never releases anyone early.
        nonce = broadcast_object(os.urandom(8).hex())
        flag = Path(flag_dir) / f".ready-{nonce}"
    agreeing = AgreeingBarrier(device, what, flag)
    try:
        return fn(agreeing)
    except BaseException:
        agreeing.fail()
        raise
    finally:
        if flag is not None and _rank() == 0:
            flag.unlink(missing_ok=True)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------------------------------------------------------
# Stop flag (SIGTERM / SIGUSR2 -> checkpoint at the next step boundary -> exit code 3)

_stop: Dict[str, Any] = {"requested": False, "signal": None}


def request_stop(reason: str = "request_stop()") -> None:
    """Ask the loop to save and stop at the next step boundary (safe to call from a signal handler)."""
    _stop["requested"] = True
    _stop["signal"] = _stop["signal"] or reason


def stop_requested() -> bool:
    return bool(_stop["requested"])


def stop_reason() -> Optional[str]:
    return _stop["signal"]


def clear_stop() -> None:
    _stop["requested"] = False
    _stop["signal"] = None


def _on_signal(signum: int, _frame: Any) -> None:
    if signum == signal.SIGINT and _stop["signal"] == "SIGINT":
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
    request_stop(signal.Signals(signum).name)


def install_signal_handlers() -> Callable[[], None]:
    """SIGTERM, SIGUSR2 and a first SIGINT (Ctrl-C) only set the stop flag; a second Ctrl-C interrupts.

    Returns a function that restores the previous handlers.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, _on_signal) for sig in (*STOP_SIGNALS, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    return restore


def log(message: str, *, env: Optional[DistEnv] = None, all_ranks: bool = False) -> None:
    """One line on stdout (rank 0 only unless ``all_ranks``), flushed so Slurm logs stay in order."""
    rank = env.rank if env is not None else int(os.environ.get("RANK", "0"))
    if rank == 0 or all_ranks:
        prefix = f"[rank {rank}] " if all_ranks else ""
        print(f"train: {prefix}{message}", flush=True, file=sys.stdout)
