"""The upload hint for W&B runs written offline (compute nodes have no internet; docs/tracking.md).

A run that finished (its job is in a final Slurm state, or it exported) with offline W&B runs not yet uploaded gets a
note with the ``wandb sync`` command to run on the login node. ``wandb sync`` leaves a ``<file>.wandb.synced`` marker
beside each ``.wandb`` file it uploaded, so synced attempts drop out of the hint. Stdlib only.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, List

from launcher.slurm import query as sq
from launcher.rundir import WANDB_DIR, WANDB_OFFLINE_GLOB


def unsynced_wandb_runs(run_dir: Path) -> List[Path]:
    """The offline W&B run directories of one run (one per attempt, oldest first) holding a .wandb file that
    ``wandb sync`` has not marked as uploaded."""
    found = []
    try:
        for attempt in sorted((run_dir / WANDB_DIR).glob(WANDB_OFFLINE_GLOB)):
            files = list(attempt.glob("*.wandb"))
            if files and not all(f.with_name(f.name + ".synced").exists() for f in files):
                found.append(attempt)
    except OSError:
        return []
    return found


def finished(run: Any) -> bool:
    return bool(run.export) or sq.is_final(run.state) or str(run.state).startswith("FINISHED")


def wandb_sync_notes(runs: List[Any]) -> List[str]:
    """One note per finished run with offline W&B data to upload: the command that uploads every attempt."""
    notes = []
    for run in runs:
        pending = unsynced_wandb_runs(Path(run.run_dir)) if finished(run) else []
        if pending:
            dirs = " ".join(shlex.quote(str(path)) for path in pending)
            notes.append(f"{run.name}: W&B ran offline; upload it from the login node: wandb sync "
                         f"{dirs}")
    return notes
