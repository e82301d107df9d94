"""What each Slurm task runs (pickled by submitit, executed inside the container on the compute node)."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import IO, Any

from launcher.rundir import EXIT_REQUEUE, REQUEUE_MARKER, attempt_log, attempt_number


class _Tee:
    """Writes to the task's own stream (Slurm's log) and to this attempt's log file."""

    def __init__(self, stream: IO[str], copy: IO[str]) -> None:
        self._stream, self._copy = stream, copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._copy.flush()
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _log_this_attempt(run_dir: str) -> None:
    """Rank 0's output also goes to logs/attempt-<N>.log: Slurm's own log is shared by every attempt of the job."""
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return
    path = attempt_log(Path(run_dir), attempt_number())
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the task)
    sys.stdout = _Tee(sys.stdout, copy)
    sys.stderr = _Tee(sys.stderr, copy)


def train_task(run_dir: str) -> int:
    """Train the run in run_dir; on a checkpointed stop, ask the batch script to requeue (it runs scontrol)."""
    _log_this_attempt(run_dir)
    from launcher.train.main import run  # the only import of the training stack, inside the job

    code = run(run_dir)
    if code in (0, EXIT_REQUEUE):
        # After submitit has written the result: skip static teardown (see launcher.train.__main__.exit_now).
        from launcher.train.__main__ import exit_now

        atexit.register(exit_now, 0)
    if code == EXIT_REQUEUE:
        if os.environ.get("SLURM_PROCID", "0") == "0":
            Path(run_dir, REQUEUE_MARKER).touch()
        return code
    if code != 0:
        raise RuntimeError(f"training in {run_dir} failed with exit code {code}; see the log above")
    return code
