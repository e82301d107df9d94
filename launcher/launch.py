"""From a validated, typed config to a local run, a dry run or a Slurm submission (login-node code: no torch,
transformers or deepspeed)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Optional

from launcher.config.schema import LauncherConfig
from launcher.config.validation import apply_global_batch
from launcher.plan.job import JobPlan, make_plan, run_dir_of
from launcher.plan.save_budget import save_budget_warning
from launcher.plan.summary import cluster_summary, local_summary
from launcher.rundir import write_config, write_script
from launcher.slurm.render import render_script


@dataclass(frozen=True)
class LaunchResult:
    """What one run or sweep point did (the sweep summary lists these)."""

    code: int
    run_dir: str
    action: str  # "submitted", "dry run", "trained locally", ...
    job_id: Optional[str] = None


def check_point(cfg: LauncherConfig) -> None:
    """Everything a submission would refuse, without submitting or writing: every point of a sweep is checked so
    before the first one is submitted or trained."""
    if cfg.cluster is None:
        return
    cfg, plan, _ = _plan_and_render(cfg)
    if not cfg.dry_run:
        from launcher.plan.fit import check_fits

        check_fits(cfg, plan.world_size)


def launch(cfg: LauncherConfig) -> LaunchResult:
    """One validated point of a run or a sweep: dry-run, submit or train locally."""
    return _launch_cluster(cfg) if cfg.cluster else _launch_local(cfg)


def _plan_and_render(cfg: LauncherConfig) -> tuple[LauncherConfig, JobPlan, str]:
    """The job plan, the config with its per-world-size values (grad_accum under a global batch) and the script."""
    plan = make_plan(cfg)
    cfg = apply_global_batch(cfg, plan.world_size)
    return cfg, plan, render_script(cfg, plan)


def _launch_cluster(cfg: LauncherConfig) -> LaunchResult:
    cfg, plan, script = _plan_and_render(cfg)
    for warning in (save_budget_warning(cfg, plan), _home_warning(cfg, plan)):
        if warning:
            print(f"launcher: {warning}", file=sys.stderr)
    if cfg.dry_run:
        _print_dry_run(cfg, plan, script)
        return LaunchResult(0, str(plan.run_dir), "dry run")
    from launcher.plan.fit import check_fits
    from launcher.slurm.submit import check_no_active_job, check_slurm_available, submit

    check_slurm_available()
    check_fits(cfg, plan.world_size)
    check_no_active_job(plan.run_dir, plan.run_name)
    write_config(plan.run_dir, dataclasses.replace(cfg, output_dir=str(plan.run_dir.parent)))
    cfg, plan, script = _wait_for_prepare_job(cfg, plan, script)
    write_script(plan.run_dir, script)
    job = submit(cfg, plan)
    print(f"launcher: submitted job {job.job_id}\n{cluster_summary(cfg, plan)}")
    print(f"  follow      python -m launcher.status logs --follow {plan.run_dir}")
    print(f"  status      python -m launcher.status {plan.run_dir.parent}")
    if cfg.train.evaluate_after:
        _submit_evaluation(cfg, plan, str(job.job_id))
    return LaunchResult(0, str(plan.run_dir), "submitted", str(job.job_id))


def _submit_evaluation(cfg: LauncherConfig, plan: JobPlan, after: str) -> None:
    """train.evaluate_after=true: the evaluation job, queued behind the training job (afterok)."""
    from launcher.rundir import EVAL_DIR
    from launcher.slurm.submit import submit_evaluation

    job = submit_evaluation(cfg, plan, after)
    print(f"launcher: submitted evaluation job {job.job_id} (starts after job {after} completes; results in "
          f"{plan.run_dir / EVAL_DIR})")


def _wait_for_prepare_job(cfg: LauncherConfig, plan: JobPlan, script: str) -> tuple[LauncherConfig, JobPlan, str]:
    """Large data without its tokenized cache: a CPU prepare job first, and this job waits for it (afterok) instead of
    holding its GPUs while rank 0 tokenizes (launcher/prepare/slurm.py; docs/data.md)."""
    from launcher.prepare.slurm import dependency_for, with_dependency

    job_id = dependency_for(cfg)
    return (cfg, plan, script) if job_id is None else _plan_and_render(with_dependency(cfg, job_id))


def _home_warning(cfg: LauncherConfig, plan: JobPlan) -> Optional[str]:
    """Checkpoints of real models do not fit a home quota (LUMI 20 GB, Leonardo 50 GB)."""
    from pathlib import Path

    if cfg.cluster.gpus_per_node and plan.run_dir.is_relative_to(Path.home()):
        return (f"WARNING: the run directory {plan.run_dir} is under $HOME, whose quota a checkpoint can exceed: "
                "set output_dir to project or scratch storage (LUMI /scratch/<project>, Leonardo $WORK or $FAST)")
    return None


def _print_dry_run(cfg: LauncherConfig, plan: JobPlan, script: str) -> None:
    from launcher.plan.budget import estimate_budget
    from launcher.plan.fit import memory_report

    # Everything that can fail first: a refused dry run leaves no job.sh behind.
    report, budget, summary = memory_report(cfg, plan.world_size), estimate_budget(cfg, plan), cluster_summary(cfg, plan)
    path = write_script(plan.run_dir, script)
    print(f"launcher: dry run, nothing submitted\n{summary}\n  script      {path}\n")
    print(f"memory per device and host memory per node ({cfg.model.name}, {plan.nodes} nodes):\n{report}\n")
    if budget is not None:
        print(f"budget: {budget.describe()}\n")
    print(script)


def _launch_local(cfg: LauncherConfig) -> LaunchResult:
    from launcher.local import describe, local_command, processes_per_node, run_local

    nproc = processes_per_node(cfg)
    cfg = apply_global_batch(cfg, nproc)
    run_dir = run_dir_of(cfg)
    print(f"launcher: local run\n{local_summary(cfg, nproc, str(run_dir))}")
    if cfg.dry_run:
        print(f"  command     {describe(local_command(cfg, run_dir))}\nlauncher: dry run, nothing started")
        return LaunchResult(0, str(run_dir), "dry run")
    write_config(run_dir, dataclasses.replace(cfg, output_dir=str(run_dir.parent)))
    code = run_local(cfg, run_dir)
    if code == 0 and cfg.train.evaluate_after:
        from launcher.evaluate import main as evaluate

        code = evaluate([str(run_dir)])
    return LaunchResult(code, str(run_dir), "trained locally" if code == 0 else f"local run exited {code}")
