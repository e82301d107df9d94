"""Reading runs: one Run per run directory, from its files and then from one Slurm query for all of them.

What each row comes from (names in launcher.rundir):

    config.yaml            cluster.name, run_name, train.max_steps
    slurm/                 submitit's folder: <jobid>_submitted.pkl, <jobid>_submission.sh, <jobid>_<task>_log.out
    logs/attempts.log      "launcher: job J attempt N started|requeued ..." lines of the batch script
    metrics.jsonl          one JSON object per logged step (only its tail is read)
    checkpoints/step-N/    complete ones hold a COMPLETE file
    export/                the exported model, once training finished
    hangs/attempt-N/       the watchdog's stack files (rank-<r>.txt: a "key: value" header, then the stacks)
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from launcher import rundir
from launcher.cli_errors import show
from launcher.slurm import query as sq
from launcher.status.hangs import hang_notes, read_hang, straggler_of
from launcher.status.safe import is_finite_number, load_yaml_mapping, open_regular, parse_record, problem_of
from launcher.status.sync import wandb_sync_notes

CONFIG_MAX_BYTES = 4 << 20  # a resolved config is a few kB
ATTEMPTS_MAX_BYTES = 4 << 20  # only the tail of a longer logs/attempts.log is read
METRICS_TAIL_BYTES = 64 << 10
# A job id as the status accepts it (ASCII digits only: no "\n", no other scripts' digits).
STRICT_JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?")

# submitit's file names: <jobid>_submitted.pkl, <jobid>_submission.sh (<arrayid>_submission.sh for an array),
# <jobid>_<task>_log.out/.err, <jobid>_<task>_result.pkl; an array task's <jobid> is <arrayid>_<index>.
_SLURM_FILE = re.compile(
    r"([0-9]+(?:_[0-9]+)?)_(?:submitted\.pkl|submission\.sh|[0-9]+_log\.(?:out|err)|[0-9]+_result\.pkl)"
)
_ATTEMPT_LINE = re.compile(r"^launcher: job (\S+) attempt (\d+) (started|requeued|hang-requeued)\b\s*(.*)$")

STATE_FINISHED_NO_SLURM = "FINISHED (no slurm)"
STATE_UNKNOWN = "UNKNOWN"
STATE_NOT_SUBMITTED = "NOT SUBMITTED"
STATE_LOCAL = "LOCAL"
STATE_FINISHED_LOCAL = "FINISHED (local)"
STATE_UNREADABLE = "UNREADABLE"


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
    # The newest evaluation (python -m launcher.evaluate: eval/<name>.json): name, perplexity, eval_accuracy, ...
    scores: Optional[Dict[str, Any]] = None
    log: Optional[str] = None  # task 0 log of the newest job
    attempts_log: Dict[str, Any] = field(default_factory=dict, repr=False)
    # The newest hang of the run (hangs/attempt-N/): step, last_step, rank, host, phase, cause, file, attempt, ranks.
    hang: Optional[Dict[str, Any]] = None
    # The last straggler report of metrics.jsonl: slowest_rank, slowest_host, straggler_ratio, warning.
    straggler: Optional[Dict[str, Any]] = None
    # "<file>: <why>" for each file of the run that could not be (fully) read; the row shows what could.
    problems: List[str] = field(default_factory=list)

    @property
    def elapsed_s(self) -> Optional[float]:
        """The ELAPSED column: training wall time over all attempts (metrics.jsonl), like STEP, LOSS and TOK/S."""
        return self.train_elapsed_s


def _is_run_dir(path: Path) -> bool:
    try:
        return rundir.is_run_dir(path)
    except OSError:  # cannot look inside: listed, and shown as unreadable
        return True


def find_runs(directory: Path) -> List[Path]:
    """DIR itself when it is a run directory, else its subdirectories that are run directories (sorted by name)."""
    if _is_run_dir(directory):
        return [directory]
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return []
    return [Path(entry.path) for entry in entries if _entry_is_dir(entry) and _is_run_dir(Path(entry.path))]


def _entry_is_dir(entry: "os.DirEntry[str]") -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _read_tail_text(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of a regular file as text ("" when absent); OSError when it cannot be read."""
    try:
        handle = open_regular(path)
    except FileNotFoundError:
        return ""
    with handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(0, size - limit))
        data = handle.read(limit)
    return data.decode("utf-8", errors="replace")


def read_attempts(path: Path, problems: Optional[List[str]] = None) -> Dict[str, Attempts]:
    """logs/attempts.log by job id (lines of other formats are ignored); why it cannot be read goes to problems."""
    attempts: Dict[str, Attempts] = {}
    try:
        text = _read_tail_text(path, ATTEMPTS_MAX_BYTES)
    except OSError as error:
        if problems is not None:
            problems.append(f"{rundir.ATTEMPTS_LOG}: {problem_of(error)}")
        return attempts
    for line in text.splitlines():
        match = _ATTEMPT_LINE.match(line.strip())
        if not match or not STRICT_JOB_ID.fullmatch(match.group(1)) or not match.group(2).isascii():
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
            match = _SLURM_FILE.fullmatch(entry.name)
            if match:
                ids.add(match.group(1))
    except OSError:
        pass
    ids.update(job_id for job_id in (attempts or {}) if STRICT_JOB_ID.fullmatch(job_id))
    # An array's <arrayid>_submission.sh names the array, not a task: drop it when its tasks are known.
    arrays = {job_id.partition("_")[0] for job_id in ids if "_" in job_id}
    return sorted((job_id for job_id in ids if job_id not in arrays), key=sq.job_sort_key)


def newest_job_of(run_dir: Path) -> Optional[str]:
    """The run's newest job id (the one logs, cancel and the row are about); None when it has none."""
    return sq.newest_job(job_ids_of(run_dir, read_attempts(run_dir / rundir.ATTEMPTS_LOG)))


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def read_config(run_dir: Path, problems: Optional[List[str]] = None) -> Dict[str, Any]:
    """cluster (name or None), run_name, max_steps of config.yaml; {} when absent or unreadable. Why it cannot be
    read, and values of the wrong type (left out), go to ``problems``."""
    found: List[str] = []
    cfg, why = load_yaml_mapping(run_dir / rundir.CONFIG_FILE, CONFIG_MAX_BYTES)
    if cfg is None:  # absent (dry run), half-written, binary or not YAML: the row shows what else is known
        if why:
            found.append(f"{rundir.CONFIG_FILE}: {why}")
        cfg = {}
    cluster, train = cfg.get("cluster"), cfg.get("train")
    name = cluster.get("name") if isinstance(cluster, dict) else cluster
    if name is not None and _text(name) is None:
        found.append(f"{rundir.CONFIG_FILE}: cluster.name={show(name, 60)} is not a string")
    elif cluster is not None and not isinstance(cluster, (dict, str)):
        found.append(f"{rundir.CONFIG_FILE}: cluster={show(cluster, 60)} is neither a mapping nor a name")
    if train is not None and not isinstance(train, dict):
        found.append(f"{rundir.CONFIG_FILE}: train={show(train, 60)} is not a mapping")
    max_steps = train.get("max_steps") if isinstance(train, dict) else None
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)):
        found.append(f"{rundir.CONFIG_FILE}: train.max_steps={show(max_steps, 60)} is not an integer")
        max_steps = None
    if problems is not None:
        problems.extend(found)
    if not cfg:
        return {}
    # A cluster that is there but unusable is "?": not a local run.
    shown = _text(name) if name is None or _text(name) is not None else "?"
    if cluster is not None and not isinstance(cluster, (dict, str)):
        shown = "?"
    return {"cluster": shown, "run_name": _text(cfg.get("run_name")), "max_steps": max_steps}


def read_run(run_dir: Path, now: Optional[float] = None) -> Run:
    """Everything the run directory says (no Slurm); what could not be read is in ``problems``."""
    problems: List[str] = []
    config = read_config(run_dir, problems)
    attempts = read_attempts(run_dir / rundir.ATTEMPTS_LOG, problems)
    job_ids = job_ids_of(run_dir, attempts)
    run = Run(
        name=run_dir.name, run_dir=str(run_dir), cluster=config.get("cluster"), job_ids=job_ids,
        job_id=sq.newest_job(job_ids), max_steps=config.get("max_steps"),
        export=_is_dir(run_dir / rundir.EXPORT_DIR), last_checkpoint=_last_checkpoint(run_dir, problems),
        problems=problems,
    )
    _read_progress(run, run_dir / rundir.METRICS_FILE, now)
    run.scores = _latest_scores(run_dir)
    run.hang = read_hang(run_dir, run.step)
    if run.job_id is not None:
        run.log = str(rundir.task_log(run_dir, run.job_id))
        entry = attempts.get(run.job_id)
        if entry is not None:
            run.attempts_log = asdict(entry)
            run.attempt, run.attempt_source, run.requeues = entry.attempt or None, "attempts.log", entry.requeues
    run.state = derived_state(run, config_present=bool(config))
    return run


def _latest_scores(run_dir: Path) -> Optional[Dict[str, Any]]:
    from launcher.evaluate import latest_scores  # stdlib results reader, shared with the evaluate command

    return latest_scores(run_dir)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _last_checkpoint(run_dir: Path, problems: List[str]) -> Optional[int]:
    try:
        return rundir.last_complete_step(run_dir)
    except OSError as error:
        problems.append(f"{rundir.CHECKPOINTS_DIR}/: {problem_of(error)}")
        return None


def read_metrics_tail(path: Path, problems: List[str], block: int = METRICS_TAIL_BYTES) -> Dict[str, Any]:
    """The last train record (with "loss") and the last eval_loss of metrics.jsonl, from its tail. A cut last line
    (a crash mid-write) and lines that are not JSON objects are skipped, and said in ``problems``."""
    try:
        handle = open_regular(path)
    except FileNotFoundError:
        return {}
    except OSError as error:
        problems.append(f"{rundir.METRICS_FILE}: {problem_of(error)}")
        return {}
    with handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(0, size - block))
        lines = handle.read(block).split(b"\n")
    if size > block:
        lines = lines[1:]  # the first line may be cut
    if lines and lines[-1].strip() and parse_record(lines[-1]) is None:
        problems.append(f"{rundir.METRICS_FILE}: the last line is cut (a crash mid-write?): ignored")
        lines = lines[:-1]
    records = [parse_record(line) for line in lines]
    bad = sum(1 for line, record in zip(lines, records) if record is None and line.strip())
    if bad:
        problems.append(f"{rundir.METRICS_FILE}: {bad} line(s) that are not JSON objects: skipped")
    result: Dict[str, Any] = {}
    for record in reversed([r for r in records if r is not None]):
        if "eval_loss" in record and "eval_loss" not in result:
            result["eval_loss"] = record["eval_loss"]
        if "loss" in record and "train" not in result:
            result["train"] = record
        if record.get("event") == "stragglers" and "stragglers" not in result:
            result["stragglers"] = record
    if size and not any(records):
        problems.append(f"{rundir.METRICS_FILE}: no readable record in its last {min(size, block):,} bytes")
    elif "train" not in result and size > block:  # eval lines at the end: look further back
        try:
            result = {**rundir.read_metrics_tail(path, block), **result}
        except (RecursionError, MemoryError):  # a line nested deeper than the parser goes
            problems.append(f"{rundir.METRICS_FILE}: a line nests too deep to parse: skipped")
    return result


def _read_progress(run: Run, metrics_path: Path, now: Optional[float]) -> None:
    """Step, loss, rates and age from the tail of metrics.jsonl; values that are not finite numbers are left out."""
    metrics = read_metrics_tail(metrics_path, run.problems)
    train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
    number = _Numbers(run.problems)
    run.step = number(train, "step", int)
    run.loss = number(train, "loss", float)
    run.tokens_per_s = number(train, "tokens_per_s", float)
    run.mfu = number(train, "mfu", float)
    run.train_elapsed_s = number(train, "elapsed_s", float)
    run.eval_loss = number(metrics, "eval_loss", float)
    run.straggler = straggler_of(metrics.get("stragglers"))
    if metrics:
        try:
            run.metrics_age_s = max(0.0, (now or time.time()) - metrics_path.stat().st_mtime)
        except OSError:
            pass


class _Numbers:
    """Reads one number of a metrics record; a value that is not a finite number is None, and said."""

    def __init__(self, problems: List[str]) -> None:
        self.problems = problems

    def __call__(self, record: Dict[str, Any], key: str, kind: type) -> Any:
        value = record.get(key)
        if value is None:
            return None
        if not is_finite_number(value):
            self.problems.append(f"{rundir.METRICS_FILE}: {key}={show(value, 60)} is not a finite number: left out")
            return None
        return kind(value)


def _read_run_or_unreadable(run_dir: Path, now: float) -> Run:
    """``read_run``, or a row saying that the run could not be read: one bad run never stops the listing."""
    try:
        return read_run(run_dir, now)
    except Exception as error:  # noqa: BLE001 - a file no reader above expected; the other rows still come
        return Run(name=run_dir.name, run_dir=str(run_dir), state=STATE_UNREADABLE,
                   problems=[f"could not be read: {problem_of(error)}"])


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
    runs = [_read_run_or_unreadable(path, now) for path in find_runs(directory)]
    ids = [run.job_id for run in runs if run.job_id is not None]
    notes = [f"{run.name}: {problem}" for run in runs for problem in run.problems]
    notes += [note for run in runs for note in hang_notes(run)]
    if not ids:
        return runs, notes + wandb_sync_notes(runs)
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
    return runs, notes + wandb_sync_notes(runs)
