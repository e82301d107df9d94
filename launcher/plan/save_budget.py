"""Is Slurm's warning signal early enough to finish a step and save before the time limit?

Measured save times (checkpoint events in the run's metrics.jsonl, from earlier attempts) win; without them the
checkpoint size is estimated from the model (bf16 weights + fp32 master weights and Adam moments = 16 bytes per trained
parameter) and a conservative per-node write bandwidth to the parallel file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from launcher.config.schema import LauncherConfig

from launcher.plan.job import JobPlan
from launcher.plan.fit import planned_shape
from launcher.rundir import METRICS_FILE, iter_metrics

ASSUMED_WRITE_GBPS_PER_NODE = 1.0  # what one Lustre client sustains for large files, conservatively
SAFETY = 1.5  # the lead must cover a save 1.5 times over (a step may still be in flight)


def needed_lead_s(save_s: float, step_s: float = 0.0) -> float:
    """THE rule, for the login node and the job alike: the warning must come early enough for the steps in flight
    (up to two: the one running and the one the agreement needs) and a save, with a safety factor."""
    return SAFETY * (save_s + 2 * step_s)


def measured_save_s(run_dir: Path) -> Optional[float]:
    """The slowest save recorded so far in this run, if it ran before (unreadable lines are skipped)."""
    times = [float(record["save_s"]) for record in iter_metrics(run_dir / METRICS_FILE)
             if record.get("event") == "checkpoint" and isinstance(record.get("save_s"), (int, float))]
    return max(times) if times else None


def estimated_save_s(cfg: LauncherConfig, plan: JobPlan) -> float:
    shape = planned_shape(cfg)
    checkpoint_bytes = 16 * shape.n_params()
    return checkpoint_bytes / (plan.nodes * ASSUMED_WRITE_GBPS_PER_NODE * 1e9)


def save_budget_warning(cfg: LauncherConfig, plan: JobPlan) -> Optional[str]:
    """A warning when cluster.signal_lead_s is shorter than a save (measured, else estimated) needs."""
    measured = measured_save_s(plan.run_dir)
    save_s, how = (measured, "measured") if measured is not None else (estimated_save_s(cfg, plan), "estimated")
    lead = cfg.cluster.signal_lead_s
    if lead >= needed_lead_s(save_s):
        return None
    return (f"WARNING: a checkpoint save takes {save_s:.0f}s ({how}) but cluster.signal_lead_s={lead}: at the time "
            f"limit the job may be killed mid-save and lose the work since the previous checkpoint; "
            f"set cluster.signal_lead_s={int(needed_lead_s(save_s)) + 60} or more")
