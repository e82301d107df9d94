"""From a validated config to a frozen job plan: what the job asks Slurm for and what it costs.

Pure functions: no Slurm, no files. ``launcher.slurm.render`` turns a plan into the batch script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from launcher.config.schema import LauncherConfig
from launcher.plan.billing import billing_units
from launcher.rundir import SLURM_DIR, run_dir

from launcher.plan.slurm_time import format_time, parse_time


@dataclass(frozen=True)
class JobPlan:
    cluster: str
    run_name: str
    run_dir: Path
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    world_size: int
    walltime_s: int
    billing_units: float
    billing_unit: str

    @property
    def walltime(self) -> str:
        return format_time(self.walltime_s)

    @property
    def slurm_folder(self) -> Path:
        """Where submitit keeps the script, the pickled task and the logs of this run."""
        return self.run_dir / SLURM_DIR


def run_dir_of(cfg: LauncherConfig) -> Path:
    """<output_dir>/<run_name>, absolute: the job may start in another directory."""
    return run_dir(cfg.output_dir, cfg.run_name)


def make_plan(cfg: LauncherConfig) -> JobPlan:
    """The plan of a cluster job (cfg must have passed launcher.config.validation.validate)."""
    cluster = cfg.cluster
    nodes = cfg.nodes
    walltime_s = parse_time(cluster.time)
    tasks = cluster.tasks
    return JobPlan(
        cluster=cluster.name,
        run_name=cfg.run_name,
        run_dir=run_dir_of(cfg),
        nodes=nodes,
        gpus_per_node=cluster.gpus_requested,
        tasks_per_node=tasks,
        cpus_per_task=cluster.cpus_per_task,
        world_size=nodes * tasks,
        walltime_s=walltime_s,
        billing_units=billing_units(cluster, nodes, walltime_s),
        billing_unit=cluster.billing_unit,
    )


def job_name(run_name: str) -> str:
    """Slurm job names show up in squeue columns: keep them short and plain."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", run_name)[:64] or "launcher"
