"""glibc's mmap threshold around the model load: freed load buffers go back to the OS, the loop's come from the heap.

glibc serves allocations of at least M_MMAP_THRESHOLD bytes with their own mapping, and raises the threshold to the
size of each such mapping freed (up to 32 MiB on 64-bit). During the load, rank 0's full state dict, the broadcast
chunks and the per-layer gather and reduce buffers of a sharded strategy are allocated and freed; once the threshold
has risen, those come from the heap, which keeps their pages: +0.3-0.6 GiB per rank (fsdp + LoRA, a 63M-parameter
Llama on CPU). So the threshold stays at its initial 128 KiB while the model is built and wrapped. For the steps:
- parameter-sharding strategies (fsdp, zero3) on CPU ranks keep it pinned: their per-layer gathers are host memory
  there, and a heap that keeps them holds about a replica (the 248M benchmark: zero3 0.57x of ddp pinned, 0.80x not);
- everything else (GPU ranks, whose gathers are device memory; ddp, zero1, zero2) gets glibc's ceiling: pinned at
  128 KiB, every per-step buffer of a CPU rank is a fresh mapping with its page faults, which halved ZeRO-2's tokens/s
  on CPU (benchmarks/loop_overhead.py).
A user's MALLOC_MMAP_THRESHOLD_ wins.
"""

from __future__ import annotations

import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LOAD_THRESHOLD = 128 << 10  # glibc's initial threshold, kept from growing while the model loads
STEP_THRESHOLD = 32 << 20  # glibc's ceiling for the dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)


def _set_threshold(size: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, size)``; False where the user set MALLOC_MMAP_THRESHOLD_ or libc is not glibc."""
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(size)))
    except (OSError, AttributeError):
        return False


def for_the_load() -> bool:
    """Before the model is built: freed buffers of 128 KiB or more return to the OS."""
    return _set_threshold(LOAD_THRESHOLD)


def for_the_steps(*, shards_parameters: bool, device_type: str) -> bool:
    """After the strategy wrapped the model: per-step buffers up to 32 MiB reuse the heap, except for a
    parameter-sharding strategy on CPU ranks (the module docstring says why)."""
    if shards_parameters and device_type == "cpu":
        return _set_threshold(LOAD_THRESHOLD)
    return _set_threshold(STEP_THRESHOLD)
