"""Status of runs: one row per run directory with its Slurm job's state and progress, its log, and cancelling it.

    runs.py     read run directories (launcher.rundir's contract) and fold in one Slurm query for all of them
    table.py    the aligned table and the --json document
    follow.py   the current attempt's offset in a log, the newest job's log, a polling tail -F
    cli.py      python -m launcher.status [DIR] | logs RUN_DIR | cancel RUN_DIR  (see docs/status.md)

Runs on the login node, so importing it must stay light: standard library, PyYAML (read lazily, for config.yaml),
launcher.rundir and launcher.slurm.query; never hydra, omegaconf, torch, numpy or submitit.
"""

from launcher.status.cli import main

__all__ = ["main"]
