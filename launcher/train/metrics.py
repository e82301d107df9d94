"""Throughput, MFU, the metrics file and the rank-0 progress display.

MFU (model FLOPs utilisation) = achieved model FLOP/s / (world size x device peak), with the FLOPs per token of
``launcher.plan.flops`` (the same count as the dry run's budget and the scaling report) and the device's dense bf16
peak from ``launcher.plan.devices`` (an fp32 run is measured against the same bf16 peak).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, TextIO, Tuple, TypeVar

from launcher.plan.devices import DEVICES
from launcher.plan.flops import flops_per_token as plan_flops
from launcher.rundir import TMP_SUFFIX, parse_metrics_line

T = TypeVar("T")


def device_peak_tflops(name: Optional[str]) -> Optional[float]:
    """The device's dense bf16 peak from THE device table (launcher.plan.devices); None for an unknown name."""
    device = DEVICES.get(name or "cpu")
    return float(device.peak_bf16_tflops) if device is not None else None


def count_parameters(model: Any) -> Dict[str, int]:
    """Parameter counts of an unwrapped model (before sharding): total, trainable, and input embedding."""
    total = trainable = 0
    seen = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    embedding = 0
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_input) and get_input() is not None:
        emb = get_input().weight
        out = get_output() if callable(get_output) else None
        tied = out is not None and getattr(out, "weight", None) is emb
        embedding = 0 if tied else logical_numel(emb)
    return {"total": total, "trainable": trainable, "embedding": embedding}


def logical_numel(param: Any) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit parameter packs two per byte (its ``numel`` is the bytes)
    and keeps the real shape in its ``quant_state``; a parameter built under ZeRO-3's ``zero.Init`` is an empty
    placeholder holding its real size in ``ds_numel``. FLOPs and the parameter count use the real one."""
    if hasattr(param, "ds_numel"):
        return int(param.ds_numel)
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        n = 1
        for size in shape:
            n *= int(size)
        return n
    return param.numel()


def flops_per_token(params: Dict[str, int], *, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """THE FLOPs count (launcher.plan.flops) for a built model's ``count_parameters``."""
    matmul = params["total"] - params["embedding"]
    return plan_flops(matmul_params=matmul, trainable_matmul_params=params["trainable"], n_layers=num_layers,
                      hidden_size=hidden_size, seq_len=seq_len)


class StepWindow:
    """The wall time of the optimizer steps since the last logged step, for tokens/s and MFU.

    ``close(sync)`` runs ``sync`` (the log step's one host synchronisation) *before* reading the clock: on a GPU the
    loop only queues work, so a clock read before the sync would leave the queued steps in no window and overstate
    throughput. Time spent in evaluation and saves is added to ``excluded_s`` and left out.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start = clock()
        self.steps = 0
        self.excluded_s = 0.0

    def close(self, sync: Callable[[], T]) -> Tuple[T, int, float]:
        """(what ``sync`` returned, steps in the window, seconds of the window); starts the next window."""
        values = sync()
        now = self.clock()
        steps, seconds = self.steps, now - self.start - self.excluded_s
        self.start, self.steps, self.excluded_s = now, 0, 0.0
        return values, steps, seconds


class PeakMemory:
    """This rank's peak memory since ``reset()`` (the loop resets after the first step, so the load's peaks and
    one-off start-up allocations are not reported as the training peak).

    GPUs: ``peak_mem_gb`` = the allocator's peak of allocated tensors, ``peak_reserved_gb`` = its peak of reserved
    memory (the cache included), which is closer to what runs out; NCCL/RCCL buffers are outside both.
    CPU: the process's peak resident set (VmHWM), reset by writing 5 to /proc/self/clear_refs where Linux allows it.
    """

    def __init__(self, device: Any) -> None:
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass  # not Linux, or not permitted: the peak stays the process's

    def read(self) -> Dict[str, float]:
        import torch

        if self.device.type == "cuda":
            return {
                "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 1e9,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 1e9,
            }
        return {"peak_mem_gb": peak_rss_bytes() / 1e9}


def peak_rss_bytes() -> int:
    """Peak resident set of this process since start or the last reset (VmHWM), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class MetricsFile:
    """``<run_dir>/metrics.jsonl``, one JSON object per line; rank 0 only; kept open, flushed when written.

    On (re)start the history is cut back to the resumed step (lines with ``step`` greater are dropped), so the file
    holds one curve across attempts, as if the run had never been interrupted. Every record written also goes to
    ``sinks`` (the experiment trackers, ``launcher.train.trackers.Trackers``): one place where metrics leave the loop.
    """

    def __init__(self, path: Path, *, resume_step: int, enabled: bool, sinks: Sequence[Any] = ()) -> None:
        self.path = Path(path)
        self._file: Optional[TextIO] = None
        self.sinks = list(sinks) if enabled else []
        if not enabled:
            return
        truncate_history(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def truncate_history(path: Path, keep_through_step: int) -> int:
    """Drop the lines of ``path`` whose step is beyond ``keep_through_step`` (atomic rewrite). Returns lines kept."""
    if not path.exists():
        return 0
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = parse_metrics_line(line)  # None for a line cut by a crash
            if record is not None and int(record.get("step", 0)) <= keep_through_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return len(kept)


class Progress:
    """Rank-0 progress: a tqdm bar on a terminal, else one plain line per logged step (readable in Slurm logs)."""

    def __init__(self, *, total: int, initial: int, enabled: bool, every: int = 1) -> None:
        self.enabled = enabled
        self.total = total
        self.every = max(1, every)
        self._bar = None
        self._start = time.monotonic()
        if not enabled:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")

    def update(self, step: int, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )
            self._bar.refresh()
            return
        if step % self.every and step != self.total:
            return
        mfu = record.get("mfu")
        print(
            f"train: step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.3e} "
            f"grad_norm {record['grad_norm']:.3f} tokens/s {record['tokens_per_s']:.0f}"
            + (f" mfu {100 * mfu:.1f}%" if mfu is not None else "")
            + f" mem {record['peak_mem_gb']:.2f}GB elapsed {record['elapsed_s']:.0f}s",
            flush=True,
        )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"train: {text}")
        else:
            print(f"train: {text}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
