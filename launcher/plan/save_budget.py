"""Is Slurm's warning signal early enough to finish a step and save before the time limit?

Measured save times (checkpoint events in the run's metrics.jsonl, from earlier attempts) win; without them the
checkpoint size is estimated from the model (bf16 weights + fp32 master weights and Adam moments = 16 bytes per trained
parameter) and a conservative per-node write bandwidth to the parallel file system.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.plan.job import JobPlan
from launcher.plan.fit import model_shape

ASSUMED_WRITE_GBPS_PER_NODE = 1.0  # what one Lustre client sustains for large files, conservatively
SAFETY = 1.5  # the lead must cover a save 1.5 times over (a step may still be in flight)


def measured_save_s(run_dir: Path) -> Optional[float]:
    """The slowest save recorded so far in this run, if it ran before."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    times = []
    for line in path.read_text().splitlines():
        if '"checkpoint"' in line:
            record = json.loads(line)
            if record.get("event") == "checkpoint" and "save_s" in record:
                times.append(float(record["save_s"]))
    return max(times) if times else None


def estimated_save_s(cfg: Mapping[str, Any], plan: JobPlan) -> float:
    shape = model_shape(cfg["model"])
    checkpoint_bytes = 16 * shape.n_params()
    return checkpoint_bytes / (plan.nodes * ASSUMED_WRITE_GBPS_PER_NODE * 1e9)


def save_budget_warning(cfg: Mapping[str, Any], plan: JobPlan) -> Optional[str]:
    """A warning when cluster.signal_lead_s is shorter than a save (measured, else estimated) needs."""
    measured = measured_save_s(plan.run_dir)
    save_s, how = (measured, "measured") if measured is not None else (estimated_save_s(cfg, plan), "estimated")
    lead = cfg["cluster"]["signal_lead_s"]
    if lead >= SAFETY * save_s:
        return None
    return (f"WARNING: a checkpoint save takes {save_s:.0f}s ({how}) but cluster.signal_lead_s={lead}: at the time "
            f"limit the job may be killed mid-save and lose the work since the previous checkpoint; "
            f"set cluster.signal_lead_s={int(SAFETY * save_s) + 60} or more")
