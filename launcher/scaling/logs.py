"""Why a point failed, from the tails of its newest job's logs.

The newest job is the one ``python -m launcher.status`` shows: newest by job id (``launcher.status.runs``), not by
file time. Its logs, in the order they are searched: submitit's ``slurm/<job>_<task>_log.{out,err}`` (task 0 first,
``.out`` before ``.err``), then rank 0's newest ``logs/attempt-<N>.log`` (``launcher.slurm.task``).

The reason is the first pattern of ``LOG_PATTERNS`` that matches a line (out of memory, time limit, the training's
own error line, cancelled, the last line of a Python traceback, NCCL error). Stdlib and ``launcher.rundir`` only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Pattern, Sequence, Tuple

from launcher import rundir
from launcher.status.runs import newest_job_of
from launcher.status.safe import open_regular

LOG_TAIL_BYTES = 64 * 1024
REASON_MAX_CHARS = 200

# (label, pattern) in priority order: the first pattern that matches any log line gives the reason.
_TRACEBACK = "traceback"
LOG_PATTERNS: Tuple[Tuple[str, Optional[Pattern[str]]], ...] = (
    ("out of memory", re.compile(r"out of memory|OutOfMemoryError|oom[-_]kill", re.IGNORECASE)),
    ("time limit", re.compile(r"DUE TO TIME LIMIT")),
    # The training's own error line names the key or file at fault: better than the traceback that follows it.
    ("error", re.compile(r"^train: .*\berror: ")),
    # A cancelled job, not a step cancelled by srun --kill-on-bad-exit after another rank failed.
    ("cancelled", re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED")),
    (_TRACEBACK, None),
    ("NCCL error", re.compile(r"NCCL error|NCCL WARN|nccl(Internal|System|Unhandled\w*|Remote)Error|DistBackendError"
                              r"|collective operation timeout", re.IGNORECASE)),
)
_ATTEMPT_LOG = re.compile(r"^attempt-(\d+)\.log$")


def clip(text: str) -> str:
    """One line of at most ``REASON_MAX_CHARS`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 3] + "..."


def tail(path: Path, n_bytes: int = LOG_TAIL_BYTES) -> List[str]:
    """The lines of the last ``n_bytes`` of a regular file (a cut first line dropped); [] when it cannot be read."""
    try:
        with open_regular(path) as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - n_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = text.splitlines()
    return lines[1:] if size > n_bytes else lines


def _task_logs(run_dir: Path, job_id: str) -> List[Path]:
    """submitit's logs of one job that exist, ordered by task, then .out before .err."""
    name = re.compile(rf"^{re.escape(job_id)}_(\d+)_log\.(out|err)$")
    try:
        names = [entry.name for entry in (run_dir / rundir.SLURM_DIR).iterdir()]
    except OSError:
        return []
    found = sorted((int(m[1]), m[2] == "err") for m in map(name.match, names) if m)
    return [rundir.task_log(run_dir, job_id, task, "err" if err else "out") for task, err in found]


def _newest_attempt_log(run_dir: Path) -> Optional[Path]:
    try:
        names = [entry.name for entry in (run_dir / rundir.LOGS_DIR).iterdir()]
    except OSError:
        return None
    numbers = [int(m[1]) for m in map(_ATTEMPT_LOG.match, names) if m]
    return rundir.attempt_log(run_dir, max(numbers)) if numbers else None


def latest_logs(run_dir: Path) -> List[Path]:
    """The logs of the newest job (see the module docstring), in the order they are searched."""
    run_dir = Path(run_dir)
    job_id = newest_job_of(run_dir)
    found = _task_logs(run_dir, job_id) if job_id is not None else []
    attempt = _newest_attempt_log(run_dir)
    return found + ([attempt] if attempt is not None else [])


def _traceback_line(lines: Sequence[str]) -> Optional[str]:
    """The exception line of the last Python traceback in ``lines`` (first unindented line after the header)."""
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        if line.strip() and not line[:1].isspace():
            return line.strip()
    return None


def _first_match(tails: Sequence[List[str]], label: str, pattern: Optional[Pattern[str]]) -> Optional[str]:
    for lines in tails:
        if pattern is None:
            found = _traceback_line(lines)
            if found:
                return found
            continue
        matches = [line.strip() for line in lines if pattern.search(line)]
        if matches:
            return f"{label}: {matches[-1]}"
    return None


def failure_reason(run_dir: Path) -> Optional[str]:
    """Why the newest job of ``run_dir`` failed, from its log tails; None when no known pattern matches."""
    tails = [tail(path) for path in latest_logs(run_dir)]
    for label, pattern in LOG_PATTERNS:
        found = _first_match(tails, label, pattern)
        if found:
            return clip(found)
    return None


def last_log_line(run_dir: Path) -> Optional[str]:
    """The last non-blank line of the first of the newest job's logs that has one."""
    for path in latest_logs(run_dir):
        lines = [line.strip() for line in tail(path) if line.strip()]
        if lines:
            return lines[-1]
    return None


def explain_failure(run_dir: Path, default: str) -> str:
    """The reason from the logs, else ``default`` with the line the logs end on."""
    reason = failure_reason(run_dir)
    if reason is None:
        last = last_log_line(run_dir)
        reason = default + (f"; log ends: {last}" if last else "")
    return clip(reason)
