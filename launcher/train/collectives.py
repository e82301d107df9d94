"""The small collectives the job itself runs: barriers, broadcasts of rank 0's decisions, the lagged stop agreement,
and the barrier that carries "I failed" for phases where rank 0 works alone."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


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
                _log(f"still waiting for rank 0 ({self.what}): {waited / 60:.0f} min")


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



def _log(message: str) -> None:
    from launcher.train.distributed import log  # distributed re-exports this module: import at call time

    log(message)
