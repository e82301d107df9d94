"""The step-progress watchdog: a thread on every rank that notices when no optimizer step completes (docs/hangs.md).

It depends on no collective (the collective may be what hangs). The loop tells it about progress through the
module-level hooks, which do nothing when no watchdog runs (``step_start``, ``step_done``, ``phase``, ``log_step``).
When no step completes within the timeout, or another rank's watchdog fired, it writes
``<run_dir>/hangs/attempt-<N>/rank-<r>.txt`` (a ``key: value`` header, then every thread's Python stack from
``faulthandler``, then ``py-spy dump`` where installed), the NCCL flight recorder's buffer beside it on NCCL, the
node file when this rank knows it is the cause, and exits the process with ``rundir.EXIT_HANG``.

The timeout (``train.hang_timeout_s``): a number fixes it; None derives it: ``STARTUP_S`` until a step is measured,
then max(``FLOOR_S``, ``STEP_FACTOR`` x the median step). Saves and evaluations get max(timeout, ``LONG_FACTOR`` x the
longest one seen so far), ``STARTUP_S`` for the first one. 0 turns the watchdog off.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

from launcher.rundir import EXIT_HANG, HANG_NODE_FILE, HANG_REASON_FILE, attempt_number, hang_dir

FLOOR_S = 600.0
STEP_FACTOR = 20.0
STARTUP_S = 1800.0  # before the first measured step: compilation, NCCL communicators, a cold file system
LONG_FACTOR = 3.0
LONG_PHASES = ("save", "eval")
PEER_GRACE_S = 30.0  # the first rank to fire waits at most this long for the others' stack files
STACK_FILE = "rank-{rank}.txt"
HEADER_END = "---"
NCCL_TRACE_DIR = "nccl"  # its own folder: torchfrtrace reads every file of the folder it is given
NCCL_TRACE_FILE = "nccl-trace-rank-"  # + rank (torch appends it to TORCH_FR_DUMP_TEMP_FILE itself)


class Watchdog:
    """One rank's watchdog; ``start()`` its thread, ``stop()`` it. Every method is cheap (the loop calls them)."""

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, timeout_s: Optional[float],
                 attempt: Optional[int] = None, backend: str = "gloo", exit_fn: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dir = hang_dir(run_dir, attempt or attempt_number())
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.fixed = float(timeout_s) if timeout_s else None
        self.exit_fn, self.clock = exit_fn, clock
        self.host = socket.gethostname()
        self.last_step: Optional[int] = None
        self.current_phase = "startup"
        now = clock()
        self.phase_since = self.last_progress = self.last_beat = now
        self.step_times: Deque[float] = deque(maxlen=101)
        self.longest: Dict[str, float] = {}
        self.culprit: Optional[str] = None  # why this rank knows it is the cause (test hooks); None: it does not
        self.fired: Optional[str] = None
        self.started_wall = time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- what the loop calls ------------------------------------------------------------------------------------
    def beat(self, step: int) -> None:
        """An optimizer step completed."""
        now = self.clock()
        if self.last_step is not None:
            self.step_times.append(now - self.last_beat)
        self.last_step, self.last_beat, self.last_progress = step, now, now
        self.current_phase, self.phase_since = "step", now

    def set_phase(self, name: str) -> None:
        self.current_phase, self.phase_since = name, self.clock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark a phase; a save or an evaluation that ends counts as progress (and leaves the step times alone)."""
        previous = self.current_phase
        self.set_phase(name)
        try:
            yield
        finally:
            now = self.clock()
            if name in LONG_PHASES:
                self.longest[name] = max(self.longest.get(name, 0.0), now - self.phase_since)
                self.last_progress = self.last_beat = now
            self.current_phase, self.phase_since = previous, now

    # -- the deadline -------------------------------------------------------------------------------------------
    def timeout_s(self) -> float:
        """Seconds without progress before firing, in the current phase."""
        if self.fixed is not None:
            base = self.fixed
        elif not self.step_times:
            base = STARTUP_S
        else:
            base = max(FLOOR_S, STEP_FACTOR * statistics.median(self.step_times))
        if self.current_phase in LONG_PHASES:
            seen = self.longest.get(self.current_phase)
            base = max(base, LONG_FACTOR * seen if seen else STARTUP_S)
        return base

    def poll_s(self) -> float:
        return min(10.0, max(0.5, self.timeout_s() / 20))

    # -- the thread -----------------------------------------------------------------------------------------------
    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._watch, name="launcher-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s()):
            idle, limit = self.clock() - self.last_progress, self.timeout_s()
            if idle > limit:
                self.fire(f"no optimizer step completed within {limit:.0f}s (idle {idle:.0f}s)")
                return
            peer = self.peer_fired()
            if peer is not None:
                self.fire(f"rank {peer}'s watchdog fired", waited_for_peers=True)
                return

    def peer_fired(self) -> Optional[int]:
        """A rank whose stack file of this attempt appeared since this watchdog started (one stat when none)."""
        if not self.dir.is_dir():
            return None
        for rank, path in stack_files(self.dir).items():
            if rank != self.rank and _mtime(path) >= self.started_wall - 1:
                return rank
        return None

    # -- firing ---------------------------------------------------------------------------------------------------
    def fire(self, reason: str, *, waited_for_peers: bool = False) -> Path:
        """Write the stack file (and the node file when this rank is the cause), then exit with EXIT_HANG."""
        self.fired = reason
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / STACK_FILE.format(rank=self.rank)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.header(reason))
            handle.write(f"{HEADER_END}\nPython stacks (faulthandler, all threads; most recent call first):\n")
            handle.flush()
            faulthandler.dump_traceback(file=handle, all_threads=True)
            handle.write(py_spy_dump(os.getpid()))
        self._dump_flight_recorder()
        if self.culprit:
            write_fault_node(self.dir, self.host, f"rank {self.rank}: {self.culprit}")
        print(f"train: [rank {self.rank}] HANG at step {self.stopped_in()}: {reason}; phase {self.current_phase}; "
              f"stacks in {path}; exit {EXIT_HANG}", file=sys.stderr, flush=True)
        if not waited_for_peers:
            self._wait_for_peers()
        self.exit_fn(EXIT_HANG)
        return path

    def stopped_in(self) -> int:
        """The step this rank was in (the last completed one + 1)."""
        return (self.last_step or 0) + 1

    def header(self, reason: str) -> str:
        now = self.clock()
        lines = {
            "hang": f"rank {self.rank} of {self.world_size}",
            "host": self.host, "pid": str(os.getpid()), "attempt": self.dir.name.split("-")[-1],
            "last completed step": "none" if self.last_step is None else str(self.last_step),
            "stopped in step": str(self.stopped_in()),
            "phase": f"{self.current_phase} (for {now - self.phase_since:.1f}s)",
            "timeout": f"{self.timeout_s():.0f}s ({'train.hang_timeout_s' if self.fixed else 'derived'})",
            "median step": f"{statistics.median(self.step_times):.3f}s" if self.step_times else "not measured",
            "reason": reason,
            "cause": self.culprit or "not known on this rank",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return "".join(f"{key}: {value}\n" for key, value in lines.items())

    def _dump_flight_recorder(self) -> None:
        """On NCCL: the flight recorder's buffer (what every collective of this rank did) beside the stacks."""
        if "nccl" not in self.backend:
            return
        try:
            import torch

            c10d = torch._C._distributed_c10d
            dump_fn = getattr(c10d, "_dump_nccl_trace", None) or c10d._dump_fr_trace  # pickled bytes
            target = self.dir / NCCL_TRACE_DIR / f"{NCCL_TRACE_FILE}{self.rank}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(dump_fn())
        except Exception as error:  # noqa: BLE001 - private API, absent in older torch, or the buffer is off
            print(f"train: [rank {self.rank}] no NCCL flight-recorder dump: {error}", file=sys.stderr, flush=True)

    def _wait_for_peers(self) -> None:
        """Give the other ranks' watchdogs time to see this file and write theirs before the launcher kills them."""
        deadline = time.monotonic() + min(PEER_GRACE_S, 2 * self.poll_s() + 5)
        while time.monotonic() < deadline and len(stack_files(self.dir)) < self.world_size:
            time.sleep(0.5)


def stack_files(directory: Path) -> Dict[int, Path]:
    """rank -> rank-<r>.txt of one attempt's hang directory."""
    found: Dict[int, Path] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        name = entry.name
        if name.startswith("rank-") and name.endswith(".txt") and name[5:-4].isdigit():
            found[int(name[5:-4])] = Path(entry.path)
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def read_header(path: Path, limit: int = 8192) -> Dict[str, str]:
    """The ``key: value`` lines before ``---`` of a stack file ({} when unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read(limit)
    except OSError:
        return {}
    header: Dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() == HEADER_END:
            break
        key, sep, value = line.partition(": ")
        if sep:
            header[key.strip()] = value.strip()
    return header


def write_fault_node(directory: Path, host: str, reason: str) -> None:
    """The host the batch script excludes on requeue (``node``), and why (``reason``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HANG_REASON_FILE).write_text(reason.replace("\n", " ") + "\n")
    tmp = directory / f"{HANG_NODE_FILE}.tmp"
    tmp.write_text(host + "\n")
    tmp.replace(directory / HANG_NODE_FILE)


def py_spy_dump(pid: int, timeout_s: float = 30.0) -> str:
    """``py-spy dump`` of this process where py-spy is installed (it needs ptrace rights), else ""."""
    exe = shutil.which("py-spy")
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as error:
        return f"\n--- py-spy dump failed: {error}\n"
    return f"\n--- py-spy dump (exit {out.returncode}):\n{out.stdout}{out.stderr}"


# -- the module-level hooks the loop calls (no-ops without a watchdog) ------------------------------------------------

_ACTIVE: Optional[Watchdog] = None
_HOOKS: Optional[Any] = None  # launcher.train.stragglers.RankHooks: test hooks and the straggler report


def active() -> Optional[Watchdog]:
    return _ACTIVE


def start(train: Any, env: Any, run_dir: Path, metrics: Any = None) -> Optional[Watchdog]:
    """Start this rank's watchdog (unless ``train.hang_timeout_s == 0``) and the straggler report. Collective when
    a test hook needs a process group of its own: every rank calls it."""
    global _ACTIVE, _HOOKS
    from launcher.train.stragglers import RankHooks

    _HOOKS = RankHooks(train, env, metrics)
    if train.hang_timeout_s == 0:
        return None
    _ACTIVE = Watchdog(run_dir, rank=env.rank, world_size=env.world_size, timeout_s=train.hang_timeout_s,
                       backend=env.backend).start()
    return _ACTIVE


def stop() -> None:
    global _ACTIVE, _HOOKS
    if _ACTIVE is not None:
        _ACTIVE.stop()
    _ACTIVE = _HOOKS = None


def step_start(step: int) -> None:
    if _HOOKS is not None:
        _HOOKS.step_start(step, _ACTIVE)


def step_done(step: int) -> None:
    if _HOOKS is not None:
        _HOOKS.step_done(step)
    if _ACTIVE is not None:
        _ACTIVE.beat(step)


def log_step(step: int) -> None:
    """After a log step's metrics line, on every rank: every ``train.straggler_every`` of them, the report."""
    if _HOOKS is not None:
        _HOOKS.log_step(step)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    if _ACTIVE is None:
        yield
        return
    with _ACTIVE.phase(name):
        yield


def flight_recorder_env(run_dir: Path, environ: Optional[Dict[str, str]] = None) -> None:
    """Where NCCL's own flight-recorder dump goes (when a profile turned it on with TORCH_NCCL_TRACE_BUFFER_SIZE):
    beside the stacks of this attempt. Before the process group exists."""
    env = os.environ if environ is None else environ
    if not env.get("TORCH_NCCL_TRACE_BUFFER_SIZE"):
        return
    target = str(hang_dir(run_dir, attempt_number(env)) / NCCL_TRACE_DIR / NCCL_TRACE_FILE)
    for name in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):  # torch >= 2.5, 2.2-2.4
        env.setdefault(name, target)
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass


def record_preflight_failure(run_dir: Path, report: Any, rank: int) -> Optional[str]:
    """Rank 0, after a failed preflight: when every failing finding points at ranks of one host, name it for the
    batch script (it excludes the node on requeue). Returns the host, or None when no single host explains it."""
    if rank != 0 or report is None:
        return None
    hosts = preflight_fault_hosts(report)
    if len(hosts) != 1:
        return None
    host = hosts[0]
    reasons = "; ".join(f.message for f in getattr(report, "failures", []))
    write_fault_node(hang_dir(run_dir, attempt_number()), host, f"preflight: {reasons}")
    return host


def preflight_fault_hosts(report: Any) -> List[str]:
    """The hosts of the ranks the failing findings name (empty when a failure names no rank)."""
    records = {r.get("rank"): r.get("host") for r in getattr(report, "records", []) if isinstance(r, dict)}
    hosts: List[str] = []
    for finding in getattr(report, "failures", []):
        if not finding.ranks:
            return []
        for rank in finding.ranks:
            host = records.get(rank)
            if host is None:
                return []
            if host not in hosts:
                hosts.append(host)
    return hosts
