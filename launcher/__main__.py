"""python -m launcher [+cluster=NAME] [model=M] [data=D] [strategy=S] [peft=P] [key=value ...] [-m]

Without +cluster: train on this machine. With +cluster=lumi|leonardo|local_slurm: submit a Slurm job.
With dry_run=true: print the summary and the batch script, write it into the run directory, submit nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from omegaconf import DictConfig

from launcher.config import check_overrides, setup_hydra
from launcher.config.schema import as_container
from launcher.errors import ConfigError
from launcher.paths import CONF_DIR


def launch(cfg: Mapping[str, Any]) -> int:
    """One point of a run or a sweep: validate, then dry-run, submit or train locally."""
    from launcher.validation import validate

    validate(cfg)
    if cfg["cluster"]:
        return _launch_cluster(cfg)
    return _launch_local(cfg)


def _launch_cluster(cfg: Mapping[str, Any]) -> int:
    from launcher.jobplan import make_plan
    from launcher.render import render_script
    from launcher.rundir import write_config, write_script
    from launcher.summary import cluster_summary

    from launcher.save_budget import save_budget_warning
    from launcher.validation import apply_global_batch

    plan = make_plan(cfg)
    cfg = apply_global_batch(cfg, plan.world_size)
    script = render_script(cfg, plan)
    warning = save_budget_warning(cfg, plan)
    if warning:
        print(f"launcher: {warning}", file=sys.stderr)
    if cfg["dry_run"]:
        from launcher.memory_check import memory_report

        path = write_script(plan.run_dir, script)
        print(f"launcher: dry run, nothing submitted\n{cluster_summary(cfg, plan)}\n  script    {path}\n")
        print(f"memory per device ({cfg['model']['name']}, {plan.nodes} nodes):\n{memory_report(cfg, plan.world_size)}\n")
        from launcher.budget import estimate_budget

        budget = estimate_budget(cfg, plan)
        if budget is not None:
            print(f"budget: {budget.describe()}\n")
        print(script)
        return 0
    from launcher.memory_check import check_fits
    from launcher.submit import check_slurm_available, submit

    check_slurm_available()
    check_fits(cfg, plan.world_size)
    write_config(plan.run_dir, {**cfg, "output_dir": str(plan.run_dir.parent)})
    write_script(plan.run_dir, script)
    job = submit(cfg, plan)
    print(f"launcher: submitted job {job.job_id}\n{cluster_summary(cfg, plan)}")
    print(f"  follow    tail -F {job.paths.stdout}")
    print(f"  status    python -m launcher.status {plan.run_dir.parent}")
    return 0


def _launch_local(cfg: Mapping[str, Any]) -> int:
    from launcher.jobplan import run_dir_of
    from launcher.local import describe, local_command, processes_per_node, run_local
    from launcher.rundir import write_config
    from launcher.summary import local_summary

    from launcher.validation import apply_global_batch

    cfg = apply_global_batch(cfg, processes_per_node(cfg))
    run_dir = run_dir_of(cfg)
    print(f"launcher: local run\n{local_summary(cfg, processes_per_node(cfg), str(run_dir))}")
    if cfg["dry_run"]:
        print(f"  command    {describe(local_command(cfg, run_dir))}\nlauncher: dry run, nothing started")
        return 0
    write_config(run_dir, {**cfg, "output_dir": str(run_dir.parent)})
    return run_local(cfg, run_dir)


def _hydra_task(cfg: DictConfig) -> None:
    try:
        code = launch(_sweep_point(as_container(cfg)))
    except ConfigError as error:
        print(f"launcher: error: {error}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)


def _sweep_point(cfg: dict) -> dict:
    """Under -m, name the point's run directory after its swept values (each point is its own run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or str(HydraConfig.get().mode) != "RunMode.MULTIRUN":
        return cfg
    from launcher.sweep import name_sweep_point

    return name_sweep_point(cfg, sys.argv[1:], list(HydraConfig.get().overrides.task))


def _is_plain_run(argv: list[str]) -> bool:
    """A single run with only config overrides: no -m, no --help/--cfg/..., no hydra.* keys."""
    return all(not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra") for arg in argv)


def main() -> None:
    argv = sys.argv[1:]
    setup_hydra()
    try:
        check_overrides(argv)
        if _is_plain_run(argv):
            # Fast path for the login node: one composition with Hydra's compose API (the same defaults and
            # override grammar). hydra.main composes twice and sets up logging and job runtime we do not use.
            from hydra.errors import HydraException

            from launcher.config import compose

            try:
                cfg = compose(argv)
            except HydraException as error:
                # Same message as hydra.main gives, without the traceback: the key and why it failed.
                cause = f"\n{error.__cause__}" if error.__cause__ else ""
                print(f"launcher: error: {error}{cause}", file=sys.stderr)
                sys.exit(2)
            _hydra_task(cfg)
            return
    except ConfigError as error:
        print(f"launcher: error: {error}", file=sys.stderr)
        sys.exit(2)
    import hydra

    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_hydra_task)()


if __name__ == "__main__":
    main()
