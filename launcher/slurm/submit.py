"""Submission through submitit: the only place that talks to sbatch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

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


def evaluation_partition(cluster: Any) -> str:
    """Where a one-device job of a finished run's tools (evaluate, generate) goes: the training partition unless it
    takes whole nodes only, else the shareable partition of the profile with the fewest nodes (LUMI: small-g)."""
    limits = cluster.partitions.get(cluster.partition)
    if limits is None or not limits.exclusive:
        return cluster.partition
    shared = [(lim.max_nodes, i, name) for i, (name, lim) in enumerate(cluster.partitions.items()) if not lim.exclusive]
    return min(shared)[2] if shared else cluster.partition


def evaluation_parameters(cfg: LauncherConfig, plan: JobPlan, after: Optional[str], name: str = "eval"
                          ) -> Dict[str, Any]:
    """SlurmExecutor parameters of a tool job (train.evaluate_after, generate --submit): one task on one device of
    the smallest shareable partition, started only when job ``after`` (if any) ended successfully; no requeue, no
    training setup (attempts.log)."""
    import shlex

    from launcher import container as containers
    from launcher.plan.job import job_name
    from launcher.plan.slurm_time import parse_time
    from launcher.slurm.render import read_template

    cluster = cfg.cluster
    setup = [f"export {name}={shlex.quote(str(value))}" for name, value in cluster.env.items()]
    if cluster.setup_template:
        setup += read_template(cluster.setup_template, run_dir=plan.run_dir, hf_home=cluster.hf_home)
    setup += containers.batch_setup_lines(cluster)
    params: Dict[str, Any] = {
        "job_name": f"{job_name(plan.run_name)}-{name}"[:64],
        "partition": evaluation_partition(cluster),
        "time": max(1, min(parse_time(cluster.time), 3600) // 60),
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": cluster.cpus_per_task,
        "stderr_to_stdout": True,
        "setup": setup,
        "srun_args": [f"--cpus-per-task={cluster.cpus_per_task}"],
        "wckey": None,
        "additional_parameters": {k: str(v) for k, v in cluster.sbatch_extra.items()},
    }
    if after is not None:
        params["dependency"] = f"afterok:{after}"
    optional = {"account": cluster.account, "qos": cluster.qos, "gpus_per_node": min(1, cluster.gpus_per_node) or None,
                "mem_per_gpu": cluster.mem_per_gpu if cluster.gpus_per_node else None}
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def submit_evaluation(cfg: LauncherConfig, plan: JobPlan, after: str) -> Any:
    """Submit ``python -m launcher.evaluate <run_dir>`` as a job that waits for the training job ``after``."""
    from launcher.evaluate import slurm_task

    return submit_tool(cfg, plan, slurm_task, [str(plan.run_dir)], after=after, name="eval")


def submit_tool(cfg: LauncherConfig, plan: JobPlan, task: Any, argv: List[str], *, after: Optional[str] = None,
                name: str = "eval") -> Any:
    """Submit ``task(argv)`` (a tool's command line, pickled by submitit) as a one-device job of the run; its Slurm
    files go to ``<run_dir>/eval/slurm`` (``slurm/`` holds the training's jobs only)."""
    check_slurm_available()
    import submitit

    from launcher.rundir import EVAL_SLURM_DIR
    from launcher.slurm.render import python_command

    executor = submitit.SlurmExecutor(folder=plan.run_dir / EVAL_SLURM_DIR, python=python_command(cfg, plan))
    executor.update_parameters(**evaluation_parameters(cfg, plan, after, name))
    return executor.submit(task, argv)
