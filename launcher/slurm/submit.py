"""Submission through submitit: the only place that talks to sbatch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from launcher.config.schema import LauncherConfig

from launcher.errors import ConfigError
from launcher.plan.job import JobPlan
from launcher.slurm.render import python_command, submitit_parameters


def check_slurm_available() -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ConfigError(
            "+cluster", "(sbatch not found)", "a machine with Slurm's sbatch and srun on the PATH",
            "run this on the cluster's login node, or add dry_run=true to see the job without submitting",
        )


def check_no_active_job(run_dir: Path, run_name: str) -> None:
    """Two job chains on one run directory would fight over its checkpoints (and pay twice): refuse the second."""
    from launcher.slurm.query import job_states
    from launcher.status.runs import job_ids_of

    if not (run_dir / "slurm").is_dir():
        return
    states = job_states(job_ids_of(run_dir))
    active = sorted((job, state.state) for job, state in states.items() if not state.final)
    if active:
        job, state = active[-1]
        raise ConfigError(
            "run_name", run_name, "a run with no queued or running job",
            f"job {job} of this run is {state}; it resumes by itself. Cancel it first "
            f"(python -m launcher.status cancel {run_dir}) or choose another run_name",
        )


def submit(cfg: LauncherConfig, plan: JobPlan) -> Any:
    """Submit the run's job; returns submitit's Job (job_id, paths.stdout)."""
    check_slurm_available()
    import submitit

    from launcher.slurm.task import train_task

    cluster = cfg.cluster
    # Requeue is ours (slurm_templates/common_teardown.sh); submitit's own counter must never refuse it first.
    executor = submitit.SlurmExecutor(
        folder=plan.slurm_folder, python=python_command(cfg, plan), max_num_timeout=cluster.max_requeues + 1000
    )
    executor.update_parameters(**submitit_parameters(cfg, plan))
    return executor.submit(train_task, str(plan.run_dir))
