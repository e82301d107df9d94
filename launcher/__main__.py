"""python -m launcher [+cluster=NAME] [model=M] [data=D] [strategy=S] [peft=P] [key=value ...] [-m]

Without +cluster: train on this machine. With +cluster=lumi|leonardo|local_slurm: submit a Slurm job.
With dry_run=true: print the summary, the memory plan and the batch script, write it into the run directory, submit
nothing. Everything here is login-node code: no torch, transformers or deepspeed.
"""

from __future__ import annotations

import sys
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from launcher.config import check_overrides, compose, setup_hydra, to_typed
from launcher.config.schema import as_container
from launcher.errors import ConfigError
from launcher.paths import CONF_DIR


def _hydra_task(cfg: DictConfig) -> Dict[str, Any]:
    from launcher.config import with_data_format
    from launcher.config.validation import check_interpolations, validate
    from launcher.launch import launch

    try:
        check_interpolations(OmegaConf.to_container(cfg, resolve=False))
        plain = _sweep_point(as_container(cfg))
        # On the plain tree first: the typed conversion would silently keep unknown '+' keys.
        data_format = validate(plain)
        result = launch(with_data_format(to_typed(cfg, run_name=plain["run_name"]), data_format))
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


def _check_every_point(argv: list[str]) -> None:
    """A -m sweep: every point is composed and checked before any is submitted or trained (Hydra's launcher would
    reach a bad third point only after submitting the first two)."""
    if not any(arg in ("-m", "--multirun") for arg in argv):
        return
    from launcher.config import validated
    from launcher.config.sweep import sweep_points
    from launcher.launch import check_point

    points = sweep_points(argv)
    for index, point in enumerate(points):
        try:
            check_point(validated(point))
        except ConfigError as error:
            print(f"launcher: error: sweep point #{index} of {len(points)} ({' '.join(point)}): {error}",
                  file=sys.stderr)
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
    _check_every_point(argv)
    import hydra

    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_hydra_task)()


if __name__ == "__main__":
    main()
