"""python -m launcher [+cluster=NAME] [model=M] [data=D] [strategy=S] [peft=P] [key=value ...] [-m]

Without +cluster: train on this machine. With +cluster=lumi|leonardo|local_slurm: submit a Slurm job.
With dry_run=true: print the summary, the memory plan and the batch script, write it into the run directory, submit
nothing. Everything here is login-node code: no torch, transformers or deepspeed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from omegaconf import DictConfig

from launcher.config import check_overrides, compose, setup_hydra
from launcher.config.schema import as_container
from launcher.errors import ConfigError
from launcher.plan.job import JobPlan, make_plan, run_dir_of
from launcher.paths import CONF_DIR
from launcher.slurm.render import render_script
from launcher.rundir import write_config, write_script
from launcher.plan.save_budget import save_budget_warning
from launcher.summary import cluster_summary, local_summary
from launcher.config.validation import apply_global_batch, validate


@dataclass(frozen=True)
class LaunchResult:
    """What one run or sweep point did (the sweep summary lists these)."""

    code: int
    run_dir: str
    action: str  # "submitted", "dry run", "trained locally", ...
    job_id: Optional[str] = None


def launch(cfg: Mapping[str, Any]) -> LaunchResult:
    """One point of a run or a sweep: validate, then dry-run, submit or train locally."""
    validate(cfg)
    return _launch_cluster(cfg) if cfg["cluster"] else _launch_local(cfg)


def _launch_cluster(cfg: Mapping[str, Any]) -> LaunchResult:
    plan = make_plan(cfg)
    cfg = apply_global_batch(cfg, plan.world_size)
    script = render_script(cfg, plan)
    for warning in (save_budget_warning(cfg, plan), _home_warning(cfg, plan)):
        if warning:
            print(f"launcher: {warning}", file=sys.stderr)
    if cfg["dry_run"]:
        _print_dry_run(cfg, plan, script)
        return LaunchResult(0, str(plan.run_dir), "dry run")
    from launcher.plan.fit import check_fits
    from launcher.slurm.submit import check_no_active_job, check_slurm_available, submit

    check_slurm_available()
    check_fits(cfg, plan.world_size)
    check_no_active_job(plan.run_dir, plan.run_name)
    write_config(plan.run_dir, {**cfg, "output_dir": str(plan.run_dir.parent)})
    write_script(plan.run_dir, script)
    job = submit(cfg, plan)
    print(f"launcher: submitted job {job.job_id}\n{cluster_summary(cfg, plan)}")
    print(f"  follow      python -m launcher.status logs --follow {plan.run_dir}")
    print(f"  status      python -m launcher.status {plan.run_dir.parent}")
    return LaunchResult(0, str(plan.run_dir), "submitted", str(job.job_id))


def _home_warning(cfg: Mapping[str, Any], plan: JobPlan) -> Optional[str]:
    """Checkpoints of real models do not fit a home quota (LUMI 20 GB, Leonardo 50 GB)."""
    from pathlib import Path

    if cfg["cluster"]["gpus_per_node"] and plan.run_dir.is_relative_to(Path.home()):
        return (f"WARNING: the run directory {plan.run_dir} is under $HOME, whose quota a checkpoint can exceed: "
                "set output_dir to project or scratch storage (LUMI /scratch/<project>, Leonardo $WORK or $FAST)")
    return None


def _print_dry_run(cfg: Mapping[str, Any], plan: JobPlan, script: str) -> None:
    from launcher.plan.budget import estimate_budget
    from launcher.plan.fit import memory_report

    path = write_script(plan.run_dir, script)
    print(f"launcher: dry run, nothing submitted\n{cluster_summary(cfg, plan)}\n  script      {path}\n")
    print(f"memory per device ({cfg['model']['name']}, {plan.nodes} nodes):\n{memory_report(cfg, plan.world_size)}\n")
    budget = estimate_budget(cfg, plan)
    if budget is not None:
        print(f"budget: {budget.describe()}\n")
    print(script)


def _launch_local(cfg: Mapping[str, Any]) -> LaunchResult:
    from launcher.local import describe, local_command, processes_per_node, run_local

    nproc = processes_per_node(cfg)
    cfg = apply_global_batch(cfg, nproc)
    run_dir = run_dir_of(cfg)
    print(f"launcher: local run\n{local_summary(cfg, nproc, str(run_dir))}")
    if cfg["dry_run"]:
        print(f"  command     {describe(local_command(cfg, run_dir))}\nlauncher: dry run, nothing started")
        return LaunchResult(0, str(run_dir), "dry run")
    write_config(run_dir, {**cfg, "output_dir": str(run_dir.parent)})
    code = run_local(cfg, run_dir)
    return LaunchResult(code, str(run_dir), "trained locally" if code == 0 else f"local run exited {code}")


def _hydra_task(cfg: DictConfig) -> Dict[str, Any]:
    try:
        result = launch(_sweep_point(as_container(cfg)))
    except ConfigError as error:
        print(f"launcher: error: {error}", file=sys.stderr)
        sys.exit(2)
    if result.code:
        sys.exit(result.code)
    return result.__dict__


def _sweep_point(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Under -m, name the point's run directory after its swept values (each point is its own run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or str(HydraConfig.get().mode) != "RunMode.MULTIRUN":
        return cfg
    from launcher.config.sweep import name_sweep_point

    return name_sweep_point(cfg, sys.argv[1:], list(HydraConfig.get().overrides.task))


def _is_plain_run(argv: list[str]) -> bool:
    """A single run with only config overrides: no -m, no --help/--cfg/..., no hydra.* keys."""
    return all(not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra") for arg in argv)


def _compose_or_exit(argv: list[str]) -> DictConfig:
    from hydra.errors import HydraException

    try:
        return compose(argv)
    except HydraException as error:
        # The same message hydra.main gives, without the traceback: the key and why it failed.
        cause = f"\n{error.__cause__}" if error.__cause__ else ""
        print(f"launcher: error: {error}{cause}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    argv = sys.argv[1:]
    setup_hydra()
    try:
        check_overrides(argv)
    except ConfigError as error:
        print(f"launcher: error: {error}", file=sys.stderr)
        sys.exit(2)
    if _is_plain_run(argv):
        # Fast path for the login node: one composition with Hydra's compose API (the same defaults and override
        # grammar). hydra.main composes twice and sets up logging and a job runtime that a single run does not use.
        _hydra_task(_compose_or_exit(argv))
        return
    import hydra

    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_hydra_task)()


if __name__ == "__main__":
    main()
