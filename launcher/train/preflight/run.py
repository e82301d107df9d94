"""``run_preflight``: every rank reports, rank 0 checks, all ranks stop together on failure.

The phases (docs/preflight.md has sample output and what to do about each finding):

1. each rank collects its record (``records.collect_record``; on GPUs also the attention probe,
   ``launcher.train.attention_probe``); ``all_gather_object`` gives every rank every record;
2. rank 0 runs the device checks (``checks.check_records``) and broadcasts them; on a failure every rank stops
   before any collective touches a broken device;
3. a short all-reduce checks the sum and measures bus bandwidth (``measure_allreduce``); each node's local rank 0
   reads the NCCL/RCCL transport from its debug log (``transport``);
4. rank 0 decides again, broadcasts, prints the table and writes ``<run_dir>/preflight.json``.

A watchdog ends the process with ``EXIT_PREFLIGHT`` when the preflight is not finished after ``timeout_s`` (a missing
rank or a hung network would otherwise block the first collective for the process group's whole timeout).
Module import is stdlib only (torch is imported inside the functions).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from launcher.rundir import EXIT_PREFLIGHT, PREFLIGHT_FILE
from launcher.train.preflight.checks import bandwidth_summary, check_allreduce, check_bandwidth, check_records
from launcher.train.preflight.records import collect_record, error_record
from launcher.train.preflight.report import (
    Finding, PreflightError, PreflightReport, decide, format_failure, format_table, write_json,
)
from launcher.train.preflight.transport import check_transport, nccl_log_plan, read_transport, restore_env

if TYPE_CHECKING:
    from launcher.config.schema import ClusterConfig, ModelConfig

# All-reduce sizes and repetitions: cheap (well under a second on 2 CPU ranks) but past the latency regime on GPUs.
GPU_BYTES = 32 * 2**20
CPU_BYTES = 4 * 2**20
GPU_WARMUP, GPU_ITERS = 2, 5
CPU_WARMUP, CPU_ITERS = 1, 3


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
    warmup = (GPU_WARMUP if on_gpu else CPU_WARMUP) if warmup is None else warmup
    iters = max(1, (GPU_ITERS if on_gpu else CPU_ITERS) if iters is None else iters)
    n, me = dist.get_world_size(group), dist.get_rank(group)
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
    for _ in range(iters):
        dist.all_reduce(tensor, group=group)
    _sync(torch, device)
    elapsed = (time.perf_counter() - start) / iters
    return {"bytes": numel * 4, "time_s": elapsed, "iters": iters, "correct": correct,
            "got": None if correct else list(got), "expected_sum": expected}


@dataclass(frozen=True)
class PreflightOptions:
    """The knobs of ``run_preflight``; the defaults are what the job uses.

    ``require_device``: None = a GPU is required unless ``cluster.device`` is ``cpu`` (or there is no cluster).
    ``expected_busbw_gbps``: None = ``cluster.expected_busbw_gbps`` (GB/s, nccl-tests' bus bandwidth).
    ``min_busbw_fraction``: fail below this fraction of the expectation (default: only warn below 50%).
    ``fail_on_socket_fallback``: a multi-node job on TCP sockets fails instead of warning.
    ``nccl_log``: a file with this rank's NCCL_DEBUG=INFO output (``%h``/``%p`` allowed); without it NCCL_DEBUG_FILE
    is read, or, when NCCL_DEBUG is unset and ``capture_nccl_debug``, each node's local rank 0 turns on NCCL INFO
    logging into ``<run_dir>/preflight/nccl-<host>-<pid>.log`` before its first collective.
    """

    group: Any = None
    expected_busbw_gbps: Optional[float] = None
    require_device: Optional[bool] = None
    timeout_s: Optional[float] = 60
    run_dir: Optional[os.PathLike | str] = None
    min_busbw_fraction: Optional[float] = None
    fail_on_socket_fallback: bool = False
    nccl_log: Optional[os.PathLike | str] = None
    capture_nccl_debug: bool = True
    bandwidth_bytes: Optional[int] = None
    print_table: bool = True
    max_table_rows: int = 256


class _Session:
    """One rank's preflight: the process-group state, what the cluster profile expects, and the phases."""

    def __init__(self, cluster: Optional["ClusterConfig"], model: Optional["ModelConfig"],
                 options: PreflightOptions, *, rank: int, local_rank: int, world_size: int, device: Any) -> None:
        import torch.distributed as dist

        self.t0 = time.perf_counter()
        self.dist, self.cluster, self.model, self.options = dist, cluster, model, options
        self.rank, self.local_rank, self.world_size, self.device = rank, local_rank, world_size, device
        self.distributed = dist.is_available() and dist.is_initialized()
        if not self.distributed and world_size > 1:
            raise PreflightError(f"preflight: world_size={world_size} but torch.distributed is not initialized "
                                 "(call run_preflight after init_process_group)")
        group = options.group
        self.group = group
        self.backend = str(dist.get_backend(group)) if self.distributed else "none"
        self.is_decider = (dist.get_rank(group) == 0) if self.distributed else True
        self.src = (dist.get_global_rank(group, 0) if group is not None else 0) if self.distributed else 0
        self.device_name = cluster.device if cluster is not None else None
        self.require_device = (self.device_name not in (None, "cpu") if options.require_device is None
                               else options.require_device)
        self.expected_busbw = (options.expected_busbw_gbps if options.expected_busbw_gbps is not None
                               else cluster.expected_busbw_gbps if cluster is not None else None)
        self.run_dir = Path(options.run_dir) if options.run_dir else None
        self.json_path = str(self.run_dir / PREFLIGHT_FILE) if self.run_dir else None
        self.watchdog: Optional[_Watchdog] = None

    # -- collectives ------------------------------------------------------------------------------------------

    def stage(self, name: str) -> None:
        if self.watchdog is not None:
            self.watchdog.stage = name

    def gather(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.dist.get_world_size(self.group)
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    # -- phases -----------------------------------------------------------------------------------------------

    def run(self) -> PreflightReport:
        """All phases; the report (same on every rank) is published by rank 0 whatever the verdict."""
        log_path, old_env = nccl_log_plan(self.backend, local_rank=self.local_rank, run_dir=self.run_dir,
                                          nccl_log=self.options.nccl_log, capture=self.options.capture_nccl_debug,
                                          environ=os.environ)
        try:
            records = self.gather(self.collect())
            findings = self.device_checks(records)
            if not decide(findings):  # stop before any collective touches a missing or shared device
                report = self.finish(records, findings, {"skipped": "a device check failed"}, "not checked")
            else:
                more, bandwidth, transport = self.network_checks(records, log_path)
                report = self.finish(records, findings + more, bandwidth, transport)
        finally:
            restore_env(old_env, os.environ)
        self.publish(report)
        return report

    def collect(self) -> Dict[str, Any]:
        """This rank's record, with the attention probe on GPUs (the kernels the memory plan assumed)."""
        self.stage("collect records")
        try:
            record = collect_record(self.rank, self.local_rank, self.device)
        except Exception as e:  # noqa: BLE001 - still join the gather, so every rank hears about it
            record = error_record(self.rank, self.local_rank, self.device, e)
        if getattr(self.device, "type", None) == "cuda":  # never raises
            from launcher.train.attention_probe import probe_attention

            self.stage("attention probe")
            probe = probe_attention(self.device, self.model)
            record["attention"] = probe.to_dict() if probe else None
        self.stage("all_gather_object of the records (first collective)")
        return record

    def device_checks(self, records: List[Dict[str, Any]]) -> List[Finding]:
        """Phase 1 on rank 0 (devices, sharing, binding, NUMA, attention), broadcast to every rank."""
        self.stage("broadcast of the device checks")
        found: List[Finding] = []
        if self.is_decider:
            found = check_records(records, world_size=self.world_size, require_device=bool(self.require_device),
                                  device_name=self.device_name,
                                  cpus_per_task=self.cluster.cpus_per_task if self.cluster is not None else None)
            if any(r.get("attention") for r in records):
                from launcher.plan.devices import planner_assumes_flash
                from launcher.train.attention_probe import record_findings

                found += [Finding(**f) for f in record_findings(
                    records, planner_assumes_flash=planner_assumes_flash(self.device_name))]
        shared = self.broadcast([asdict(f) for f in found])
        return [Finding(**f) for f in shared]

    def network_checks(self, records: List[Dict[str, Any]],
                       log_path: Optional[str]) -> Tuple[List[Finding], Dict[str, Any], str]:
        """Phase 2: the all-reduce, the measurements gathered into ``records``, rank 0's verdict broadcast."""
        self.stage("all-reduce bandwidth test")
        if self.distributed and self.dist.get_world_size(self.group) > 1:
            measured = measure_allreduce(self.device, group=self.group, nbytes=self.options.bandwidth_bytes)
        else:
            measured = {"bytes": 0, "time_s": 0.0, "correct": True}
        mine = {"time_s": measured["time_s"], "correct": measured["correct"], "got": measured.get("got"),
                **read_transport(log_path), "nccl_log": log_path}
        self.stage("all_gather_object of the measurements")
        for r, m in zip(records, self.gather(mine)):
            r.update(m)
        self.stage("broadcast of the verdict")
        verdict: Dict[str, Any] = {}
        if self.is_decider:
            bandwidth = bandwidth_summary(int(measured["bytes"]), [float(r["time_s"]) for r in records], len(records))
            bandwidth["expected_busbw_gbps"] = self.expected_busbw
            overall, transport_findings = check_transport(
                records, backend=self.backend, fail_on_socket=self.options.fail_on_socket_fallback,
                cluster=self.cluster)
            found = (check_allreduce(records, measured.get("expected_sum"))
                     + check_bandwidth(bandwidth, expected_busbw_gbps=self.expected_busbw,
                                       fail_fraction=self.options.min_busbw_fraction)
                     + transport_findings)
            verdict = {"findings": [asdict(f) for f in found], "bandwidth": bandwidth, "transport": overall}
        verdict = self.broadcast(verdict)
        return [Finding(**f) for f in verdict["findings"]], verdict["bandwidth"], verdict["transport"]

    # -- the report -------------------------------------------------------------------------------------------

    def finish(self, records: List[Dict[str, Any]], findings: List[Finding], bandwidth: Dict[str, Any],
               transport: str) -> PreflightReport:
        return PreflightReport(
            ok=decide(findings), world_size=len(records), hosts=sorted({r["host"] for r in records}),
            findings=findings, records=sorted(records, key=lambda r: r["rank"]), bandwidth=bandwidth,
            transport=transport, backend=self.backend, elapsed_s=time.perf_counter() - self.t0,
            json_path=self.json_path,
        )

    def publish(self, report: PreflightReport) -> None:
        """Rank 0: ``preflight.json``, the table, and the transport warnings once more on stderr."""
        if not self.is_decider:
            return
        if self.json_path:
            try:
                write_json(report, Path(self.json_path))
            except OSError as e:
                report.findings.append(Finding("warn", "report", f"could not write {self.json_path}: {e}"))
        if self.options.print_table:
            print(format_table(report, max_rows=self.options.max_table_rows), flush=True)
            for f in report.findings:
                if f.check == "transport" and f.level in ("warn", "fail"):
                    print(f"\n!!! preflight: {f.message}\n!!! {f.hint}\n", file=sys.stderr, flush=True)


def run_preflight(cluster: Optional["ClusterConfig"], *, rank: int, local_rank: int, world_size: int, device: Any,
                  model: Optional["ModelConfig"] = None,
                  options: Optional[PreflightOptions] = None) -> PreflightReport:
    """Check this allocation before training; every rank calls it, after ``init_process_group``.

    ``cluster``: the machine profile (``cluster.device``, ``cluster.cpus_per_task``, ``cluster.expected_busbw_gbps``,
    and ``cluster.env`` and the container binds to name a socket fallback's cause); None for a local run.
    ``model``: the model section, for the attention probe's head shape on GPUs. ``options``: ``PreflightOptions``.

    Returns the report (the same verdict on every rank); raises ``PreflightError`` on every rank when a check
    fails. Rank 0 prints the table and writes ``<run_dir>/preflight.json``. A process still inside after
    ``options.timeout_s`` seconds exits with ``EXIT_PREFLIGHT``.
    """
    options = options or PreflightOptions()
    session = _Session(cluster, model, options, rank=rank, local_rank=local_rank, world_size=world_size,
                       device=device)
    with _Watchdog(options.timeout_s, rank) as watchdog:
        session.watchdog = watchdog
        report = session.run()
    if not report.ok:
        raise PreflightError(format_failure(report), report)
    return report
