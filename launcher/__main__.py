"""python -m launcher [+cluster=NAME] [model=M] [data=D] [strategy=S] [peft=P] [key=value ...] [-m]

Without +cluster: train on this machine. With +cluster=lumi|leonardo|local_slurm: submit a Slurm job.
With dry_run=true: print the summary, the memory plan and the batch script, write it into the run directory, submit
nothing. Everything here is login-node code: no torch, transformers or deepspeed.

Errors take one path (``launcher.cli_errors``): the user's (a ConfigError, a Hydra or OmegaConf error) is one line and
exit 2; anything else is an internal error, one line naming the file with the traceback, exit 1.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf

from launcher.cli_errors import EXIT_INTERNAL, EXIT_USER, describe, internal_error_line, run_cli, write_traceback
from launcher.config import check_overrides, compose, setup_hydra, to_typed, with_resolved_inputs
from launcher.config.schema import as_container
from launcher.errors import ConfigError
from launcher.paths import CONF_DIR


def _run_point(cfg: DictConfig) -> Any:
    """One run or sweep point: check the composed config, convert it once, then launch (a LaunchResult)."""
    from launcher.config.validation import check_interpolations, validate
    from launcher.launch import launch

    check_interpolations(OmegaConf.to_container(cfg, resolve=False))
    plain = _sweep_point(as_container(cfg))
    # On the plain tree first: the typed conversion would silently keep unknown '+' keys.
    data_format = validate(plain)
    return launch(with_resolved_inputs(to_typed(plain), data_format))


def _hydra_task(cfg: DictConfig) -> Dict[str, Any]:
    """The task hydra.main runs for each point of a -m sweep: errors become the same one line as a plain run's."""
    try:
        result = _run_point(cfg)
    except Exception as error:  # noqa: BLE001 - Hydra would print its own traceback otherwise
        line = describe(error, sys.argv[1:])
        print(line or internal_error_line(error, write_traceback(error, sys.argv[1:])), file=sys.stderr)
        if line and getattr(error, "details", ""):
            print(error.details, file=sys.stderr)  # type: ignore[attr-defined]
        sys.exit(EXIT_USER if line else EXIT_INTERNAL)
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


def _is_plain_run(argv: List[str]) -> bool:
    """A single run with only config overrides: no -m, no --help/--cfg/..., no hydra.* keys."""
    return all(not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra") for arg in argv)


def _check_every_point(argv: List[str]) -> None:
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
            raise ConfigError(error.field, error.value, error.allowed,
                              f"sweep point #{index} of {len(points)}: {' '.join(point)}") from None


def _main(argv: List[str]) -> int:
    setup_hydra()
    check_overrides(argv)
    if _is_plain_run(argv):
        # Fast path for the login node: one composition with Hydra's compose API (the same defaults and override
        # grammar). hydra.main composes twice and sets up logging and a job runtime that a single run does not use.
        return _run_point(compose(argv)).code
    _check_every_point(argv)
    import hydra

    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_hydra_task)()
    return 0


def main() -> None:
    sys.exit(run_cli(_main))


if __name__ == "__main__":
    main()
