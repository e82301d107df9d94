"""What each Slurm task runs (pickled by submitit, executed inside the container on the compute node)."""

from __future__ import annotations

import os
from pathlib import Path

# Exit code of launcher.train.main.run: a stop signal arrived, every rank saved, the job should requeue.
EXIT_REQUEUE = 3
REQUEUE_MARKER = ".requeue_requested"


def train_task(run_dir: str) -> int:
    """Train the run in run_dir; on a checkpointed stop, ask the batch script to requeue (it runs scontrol)."""
    from launcher.train.main import run  # the only import of the training stack, inside the job

    code = run(run_dir)
    if code == EXIT_REQUEUE:
        if os.environ.get("SLURM_PROCID", "0") == "0":
            Path(run_dir, REQUEUE_MARKER).touch()
        return code
    if code != 0:
        raise RuntimeError(f"training in {run_dir} failed with exit code {code}; see the log above")
    return code
