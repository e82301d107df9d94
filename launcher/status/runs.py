"""Reading runs: one Run per run directory, from its files and then from one Slurm query for all of them.

What each row comes from (names in launcher.rundir):

    config.yaml            cluster.name, run_name, train.max_steps
    slurm/                 submitit's folder: <jobid>_submitted.pkl, <jobid>_submission.sh, <jobid>_<task>_log.out
    logs/attempts.log      "launcher: job J attempt N started|requeued ..." lines of the batch script
    metrics.jsonl          one JSON object per logged step (only its tail is read)
    checkpoints/step-N/    complete ones hold a COMPLETE file
    export/                the exported model, once training finished
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from launcher import rundir
from launcher.slurm import query as sq

# submitit's file names: <jobid>_submitted.pkl, <jobid>_submission.sh (<arrayid>_submission.sh for an array),
# <jobid>_<task>_log.out/.err, <jobid>_<task>_result.pkl; an array task's <jobid> is <arrayid>_<index>.
_SLURM_FILE = re.compile(
    rf"^({sq.JOB_ID_PATTERN})_(?:submitted\.pkl|submission\.sh|\d+_log\.(?:out|err)|\d+_result\.pkl)$"
)
_ATTEMPT_LINE = re.compile(r"^launcher: job (\S+) attempt (\d+) (started|requeued)\b\s*(.*)$")

STATE_FINISHED_NO_SLURM = "FINISHED (no slurm)"
STATE_UNKNOWN = "UNKNOWN"
STATE_NOT_SUBMITTED = "NOT SUBMITTED"
STATE_LOCAL = "LOCAL"
STATE_FINISHED_LOCAL = "FINISHED (local)"


@dataclass
class Attempts:
    """What logs/attempts.log says about one job."""

    attempt: int = 0  # the highest attempt that started
    requeues: int = 0  # "requeued" lines
    started: Optional[str] = None  # "2026-11-25T10:00:00+00:00 on node1" of the last start
    last_event: str = ""  # started | requeued


@dataclass
class Run:
    """One row of the listing (and of --json)."""

    name: str
    run_dir: str
    cluster: Optional[str] = None
    job_ids: List[str] = field(default_factory=list)
    job_id: Optional[str] = None  # the newest job: the one the row is about
    state: str = STATE_UNKNOWN  # what the table shows
    state_source: str = "run directory"  # sacct | squeue | scontrol | run directory
    reason: Optional[str] = None
    exit_code: Optional[str] = None
    attempt: Optional[int] = None
    attempt_source: Optional[str] = None  # slurm | attempts.log
    requeues: Optional[int] = None
    step: Optional[int] = None
    max_steps: Optional[int] = None
    loss: Optional[float] = None
    eval_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    train_elapsed_s: Optional[float] = None  # metrics.jsonl: training wall time over all attempts
    slurm_elapsed_s: Optional[int] = None  # Slurm: the current attempt of the newest job
    metrics_age_s: Optional[float] = None  # seconds since metrics.jsonl was last written
    last_checkpoint: Optional[int] = None  # step of the newest complete checkpoint
    export: bool = False
    log: Optional[str] = None  # task 0 log of the newest job
    attempts_log: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def elapsed_s(self) -> Optional[float]:
        """The ELAPSED column: training wall time over all attempts (metrics.jsonl), like STEP, LOSS and TOK/S."""
        return self.train_elapsed_s


def find_runs(directory: Path) -> List[Path]:
    """DIR itself when it is a run directory, else its subdirectories that are run directories (sorted by name)."""
    if rundir.is_run_dir(directory):
        return [directory]
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Path(entry.path) for entry in entries if entry.is_dir() and rundir.is_run_dir(Path(entry.path))]


def read_attempts(path: Path) -> Dict[str, Attempts]:
    """logs/attempts.log by job id (lines of other formats are ignored)."""
    attempts: Dict[str, Attempts] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return attempts
    for line in text.splitlines():
        match = _ATTEMPT_LINE.match(line.strip())
        if not match:
            continue
        job_id, number, event, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        entry = attempts.setdefault(job_id, Attempts())
        entry.last_event = event
        if event == "started":
            entry.attempt = max(entry.attempt, number)
            entry.started = rest or None
        else:
            entry.requeues += 1
    return attempts


def job_ids_of(run_dir: Path, attempts: Optional[Dict[str, Attempts]] = None) -> List[str]:
    """Job ids of a run, oldest first: from submitit's files in slurm/ and from logs/attempts.log."""
    ids = set()
    try:
        for entry in os.scandir(run_dir / rundir.SLURM_DIR):
            match = _SLURM_FILE.match(entry.name)
            if match:
                ids.add(match.group(1))
    except (FileNotFoundError, NotADirectoryError):
        pass
    ids.update(job_id for job_id in (attempts or {}) if sq.is_job_id(job_id))
    # An array's <arrayid>_submission.sh names the array, not a task: drop it when its tasks are known.
    arrays = {job_id.partition("_")[0] for job_id in ids if "_" in job_id}
    return sorted((job_id for job_id in ids if job_id not in arrays), key=sq.job_sort_key)


def newest_job_of(run_dir: Path) -> Optional[str]:
    """The run's newest job id (the one logs, cancel and the row are about); None when it has none."""
    return sq.newest_job(job_ids_of(run_dir, read_attempts(run_dir / rundir.ATTEMPTS_LOG)))


def read_config(run_dir: Path) -> Dict[str, Any]:
    """cluster (name or None), run_name, max_steps of config.yaml; {} when absent or unreadable."""
    cfg = rundir.read_config_yaml(run_dir)
    if cfg is None:  # absent (dry run), half-written, or not YAML: the row shows what else is known
        return {}
    cluster = cfg.get("cluster")
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    max_steps = train.get("max_steps")
    return {
        "cluster": cluster.get("name") if isinstance(cluster, dict) else cluster,
        "run_name": cfg.get("run_name"),
        "max_steps": max_steps if isinstance(max_steps, int) else None,
    }


def read_run(run_dir: Path, now: Optional[float] = None) -> Run:
    """Everything the run directory says (no Slurm)."""
    config = read_config(run_dir)
    attempts = read_attempts(run_dir / rundir.ATTEMPTS_LOG)
    job_ids = job_ids_of(run_dir, attempts)
    run = Run(
        name=run_dir.name, run_dir=str(run_dir), cluster=config.get("cluster"), job_ids=job_ids,
        job_id=sq.newest_job(job_ids), max_steps=config.get("max_steps"),
        export=(run_dir / rundir.EXPORT_DIR).is_dir(), last_checkpoint=rundir.last_complete_step(run_dir),
    )
    _read_progress(run, run_dir / rundir.METRICS_FILE, now)
    if run.job_id is not None:
        run.log = str(rundir.task_log(run_dir, run.job_id))
        entry = attempts.get(run.job_id)
        if entry is not None:
            run.attempts_log = asdict(entry)
            run.attempt, run.attempt_source, run.requeues = entry.attempt or None, "attempts.log", entry.requeues
    run.state = derived_state(run, config_present=bool(config))
    return run


def _read_progress(run: Run, metrics_path: Path, now: Optional[float]) -> None:
    """Step, loss, rates and age from the tail of metrics.jsonl."""
    metrics = rundir.read_metrics_tail(metrics_path)
    train = metrics.get("train") or {}
    run.step = _number(train.get("step"), int)
    run.loss = _number(train.get("loss"), float)
    run.tokens_per_s = _number(train.get("tokens_per_s"), float)
    run.mfu = _number(train.get("mfu"), float)
    run.train_elapsed_s = _number(train.get("elapsed_s"), float)
    run.eval_loss = _number(metrics.get("eval_loss"), float)
    if metrics:
        try:
            run.metrics_age_s = max(0.0, (now or time.time()) - metrics_path.stat().st_mtime)
        except OSError:
            pass


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value)


def derived_state(run: Run, config_present: bool = True) -> str:
    """The state when Slurm gives none: from the run directory alone."""
    if run.job_id is None:
        if config_present and run.cluster is None:  # a local run (python -m launcher without +cluster)
            return STATE_FINISHED_LOCAL if run.export else STATE_LOCAL
        return STATE_FINISHED_NO_SLURM if run.export else STATE_NOT_SUBMITTED
    return STATE_FINISHED_NO_SLURM if run.export else STATE_UNKNOWN


def apply_slurm(run: Run, job: Optional[sq.JobState]) -> None:
    """Fold the newest job's Slurm state into the row."""
    if job is None:
        return
    run.state = job.state
    run.state_source = job.source
    run.reason = job.reason
    run.exit_code = job.exit_code
    run.slurm_elapsed_s = job.elapsed_s
    if job.restarts is not None:
        run.attempt, run.attempt_source, run.requeues = job.attempt, "slurm", job.restarts


def collect(directory: Path, *, query: Optional[Callable[[List[str]], sq.Query]] = None) -> Tuple[List[Run], List[str]]:
    """The rows of DIR and notes on what could not be asked (one Slurm query for all runs)."""
    now = time.time()
    runs = [read_run(path, now) for path in find_runs(directory)]
    ids = [run.job_id for run in runs if run.job_id is not None]
    notes: List[str] = []
    if not ids:
        return runs, notes
    result = (query or sq.query_jobs)(ids)
    if not result.slurm_available:
        notes.append("no Slurm commands (sacct, squeue, scontrol) on the PATH: states come from the run directories")
    for error in result.errors:
        notes.append(error)
    if result.errors and result.states:
        notes.append(f"states from {', '.join(result.sources) or 'no source'}")
    for run in runs:
        if run.job_id is not None:
            apply_slurm(run, result.get(run.job_id))
    return runs, notes
