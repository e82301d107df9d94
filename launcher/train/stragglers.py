"""The straggler report and the test hooks that make a rank hang or run slow (docs/hangs.md).

The straggler report: every ``train.straggler_every`` logged steps the ranks all-gather the wall-clock times at which
each of the window's steps completed on them (one float64 all_gather of at most ``MAX_WINDOW`` values per rank).
Data-parallel ranks leave every step's gradient synchronisation together, so a slow rank does not show in its own
step time (everybody waits for it) but in how late it finishes each step: a rank's own time of step k is the step's
wall time minus how long before the last rank it finished, ``(t_last(k) - t_last(k-1)) - (t_last(k) - t_r(k))``.
Rank 0 writes ``{"event": "stragglers", "slowest_rank", "slowest_host", "straggler_ratio", ...}`` to metrics.jsonl:
the ratio is the slowest rank's median own step time over the median of the other ranks' (with 2 ranks the median of
all would be their mean). The same rank above ``train.straggler_ratio`` for ``WARN_AFTER`` windows in a row gets a
warning line (again every ``WARN_EVERY`` windows), and every report while it lasts carries ``straggler_warning``.

What it sees is the work a rank does after the synchronisation (optimizer step, host work, waiting for data on the
host); time a slow GPU spends before the gradients are reduced is hidden by the synchronisation itself.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections import deque
from typing import Any, Deque, List, Optional, Sequence

from launcher.rundir import attempt_number

MAX_WINDOW = 256
WARN_AFTER = 3
WARN_EVERY = 10  # windows between repeated warnings for the same straggler


def own_step_times(times: Sequence[Sequence[float]]) -> List[float]:
    """Per rank: the median over the window of its own step time (see the module docstring). ``times[r][k]``: when
    step k completed on rank r (seconds, one clock)."""
    steps = min(len(row) for row in times)
    if steps < 2:
        return [0.0 for _ in times]
    last = [max(row[k] for row in times) for k in range(steps)]
    own = []
    for row in times:
        values = [(last[k] - last[k - 1]) - (last[k] - row[k]) for k in range(1, steps)]
        own.append(statistics.median(values))
    return own


def straggler_summary(own: Sequence[float], hosts: Sequence[str]) -> dict:
    """slowest_rank, slowest_host, straggler_ratio (slowest / the other ranks' median), median_step_s,
    slowest_step_s."""
    slowest = max(range(len(own)), key=lambda r: own[r])
    others = [value for rank, value in enumerate(own) if rank != slowest] or list(own)
    median = statistics.median(others)  # of the other ranks: with 2 ranks the median of all would be the mean
    ratio = own[slowest] / median if median > 0 else 1.0
    return {"slowest_rank": slowest, "slowest_host": hosts[slowest] if slowest < len(hosts) else None,
            "straggler_ratio": round(ratio, 4), "median_step_s": median, "slowest_step_s": own[slowest]}


class StragglerStreak:
    """Counts windows in a row in which the same rank is above the ratio; says when to warn."""

    def __init__(self, threshold: float) -> None:
        self.threshold, self.rank, self.count = threshold, None, 0

    def update(self, summary: dict) -> Optional[str]:
        above = summary["straggler_ratio"] > self.threshold
        if not above:
            self.rank, self.count = None, 0
            return None
        self.count = self.count + 1 if summary["slowest_rank"] == self.rank else 1
        self.rank = summary["slowest_rank"]
        if self.count < WARN_AFTER or (self.count - WARN_AFTER) % WARN_EVERY:
            return None
        return self.text(summary)

    def text(self, summary: dict) -> str:
        return (f"WARNING: straggler: rank {self.rank} on {summary['slowest_host']} took "
                f"{summary['straggler_ratio']:.2f}x the median step time ({summary['slowest_step_s']:.3f}s vs "
                f"{summary['median_step_s']:.3f}s) for {self.count} windows in a row (train.straggler_ratio="
                f"{self.threshold}); check that node (docs/hangs.md)")


class RankHooks:
    """Per rank: the test hooks (``train.debug_hang_*``, ``train.debug_slow_*``) and the straggler report."""

    def __init__(self, train: Any, env: Any, metrics: Any) -> None:
        self.env, self.metrics = env, metrics
        last = env.world_size - 1
        self.hang_step = train.debug_hang_at_step
        if train.debug_hang_attempts is not None and attempt_number() > int(train.debug_hang_attempts):
            self.hang_step = None  # a later attempt (e.g. resubmitted around the "bad" node) trains on
        self.hang_rank = last if train.debug_hang_rank is None else int(train.debug_hang_rank)
        self.hang_in = train.debug_hang_in
        self.slow_rank = train.debug_slow_rank
        extra = float(train.debug_step_sleep_s or 0.0) * (float(train.debug_slow_factor) - 1.0)
        self.slow_extra_s = max(0.0, extra) if self.slow_rank == env.rank else 0.0
        self.every = int(train.straggler_every or 0) if env.world_size > 1 else 0
        self.streak = StragglerStreak(float(train.straggler_ratio))
        self.done: Deque[float] = deque(maxlen=MAX_WINDOW)
        self.logs = 0
        self.hosts: Optional[List[str]] = None
        self.hang_group = None
        if self.hang_step is not None and self.hang_in == "collective" and env.world_size > 1:
            import torch.distributed as dist

            self.hang_group = dist.new_group(backend="gloo")  # every rank creates it; only the hung rank uses it

    def step_start(self, step: int, watchdog: Any) -> None:
        if step == self.hang_step and self.env.rank == self.hang_rank:
            self._hang(watchdog)

    def _hang(self, watchdog: Any) -> None:
        """Block forever: in an all-reduce the other ranks never join, or in a sleep outside any collective."""
        where = "collective" if self.hang_group is not None else "sleep"
        if watchdog is not None:
            watchdog.culprit = f"train.debug_hang_at_step={self.hang_step} ({where})"
            watchdog.set_phase(where)
        if where == "collective":
            import torch
            import torch.distributed as dist

            try:
                dist.all_reduce(torch.zeros(1), group=self.hang_group)  # debug hang: no other rank joins
            except Exception:  # noqa: BLE001 - the group's own timeout: stay hung
                pass
        threading.Event().wait()  # debug hang: sleeps forever (also after a collective that gave up)

    def step_done(self, step: int) -> None:
        if self.slow_extra_s:
            time.sleep(self.slow_extra_s)  # debug straggler: after the step, like debug_step_sleep_s
        if self.every:
            self.done.append(time.time())

    def log_step(self, step: int) -> None:
        if not self.every:
            return
        self.logs += 1
        if self.logs % self.every:
            return
        summary = self.gather()
        self.done.clear()
        if summary is None or not self.env.is_main:
            return
        warning = self.streak.update(summary)
        record = {"step": step, "event": "stragglers", **summary, "straggler_streak": self.streak.count}
        if self.streak.count >= WARN_AFTER:  # every report while it lasts (status shows it); the log line less often
            record["straggler_warning"] = self.streak.text(summary)
        if warning:
            print(f"train: {warning}", flush=True)
        if self.metrics is not None:
            self.metrics.write(record)

    def gather(self) -> Optional[dict]:
        """Collective: one all_gather of the window's completion times (and the host names once)."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        if self.hosts is None:
            hosts: List[Any] = [None] * self.env.world_size
            dist.all_gather_object(hosts, socket.gethostname())
            self.hosts = [str(h) for h in hosts]
        values = torch.tensor(list(self.done), dtype=torch.float64, device=self.env.device)
        parts = [torch.empty_like(values) for _ in range(self.env.world_size)]
        dist.all_gather(parts, values)
        times = [part.tolist() for part in parts]
        if min(len(row) for row in times) < 2:
            return None
        summary = straggler_summary(own_step_times(times), self.hosts)
        summary["window_steps"] = len(times[0])
        return summary
