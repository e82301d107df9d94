"""Status of runs: one row per run directory, its Slurm job's state, progress and log.

    python -m launcher.status [DIR] [--json]              DIR: a directory of runs (default ./runs) or one run
    python -m launcher.status logs RUN_DIR [--follow] [--task N] [--job ID] [--all]
    python -m launcher.status cancel RUN_DIR [--job ID]

Login node only: standard library (plus PyYAML, which omegaconf brings, to read config.yaml), no training stack.
Slurm is asked once for every run together (launcher.slurm.query); the rest comes from the run directories:

    config.yaml            cluster.name, run_name, train.max_steps
    slurm/                 submitit's folder: <jobid>_submitted.pkl, <jobid>_submission.sh, <jobid>_<task>_log.out
    logs/attempts.log      "launcher: job J attempt N started|requeued ..." lines of the batch script
    metrics.jsonl          one JSON object per logged step (only its tail is read)
    checkpoints/step-N/    complete ones hold a COMPLETE file
    export/                the exported model, once training finished
See docs/status.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, IO, List, Optional, Sequence, Tuple

from launcher.slurm import query as sq

DEFAULT_DIR = "./runs"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ATTEMPTS_LOG = Path("logs") / "attempts.log"
SLURM_DIR = "slurm"
EXPORT_DIR = "export"
CHECKPOINTS_DIR = "checkpoints"
_RUN_MARKERS = (CONFIG_FILE, "job.sh", SLURM_DIR, METRICS_FILE, str(ATTEMPTS_LOG))

# submitit's file names: <jobid>_submitted.pkl, <jobid>_submission.sh (<arrayid>_submission.sh for an array),
# <jobid>_<task>_log.out/.err, <jobid>_<task>_result.pkl; an array task's <jobid> is <arrayid>_<index>.
_SLURM_FILE = re.compile(
    rf"^({sq.JOB_ID_PATTERN})_(?:submitted\.pkl|submission\.sh|\d+_log\.(?:out|err)|\d+_result\.pkl)$"
)
_ATTEMPT_LINE = re.compile(r"^launcher: job (\S+) attempt (\d+) (started|requeued)\b\s*(.*)$")
# The batch script's first line of an attempt in the task-0 log (slurm_templates/common_setup.sh).
_ATTEMPT_MARKER = re.compile(rb"(?:^|\n)(launcher: job \S+ attempt \d+ on )")

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


# --------------------------------------------------------------------------------------------- run directories


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in _RUN_MARKERS)


def find_runs(directory: Path) -> List[Path]:
    """DIR itself when it is a run directory, else its subdirectories that are run directories (sorted by name)."""
    if is_run_dir(directory):
        return [directory]
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Path(entry.path) for entry in entries if entry.is_dir() and is_run_dir(Path(entry.path))]


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
        for entry in os.scandir(run_dir / SLURM_DIR):
            match = _SLURM_FILE.match(entry.name)
            if match:
                ids.add(match.group(1))
    except (FileNotFoundError, NotADirectoryError):
        pass
    ids.update(job_id for job_id in (attempts or {}) if sq.is_job_id(job_id))
    # An array's <arrayid>_submission.sh names the array, not a task: drop it when its tasks are known.
    arrays = {job_id.partition("_")[0] for job_id in ids if "_" in job_id}
    return sorted((job_id for job_id in ids if job_id not in arrays), key=sq.job_sort_key)


def _yaml_load(text: str) -> Any:
    import yaml  # PyYAML, a dependency of omegaconf

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)


def read_config(run_dir: Path) -> Dict[str, Any]:
    """cluster (name or None), run_name, max_steps of config.yaml; {} when absent or unreadable."""
    try:
        cfg = _yaml_load((run_dir / CONFIG_FILE).read_text())
    except Exception:  # absent (dry run), half-written, or not YAML: the row shows what else is known
        return {}
    if not isinstance(cfg, dict):
        return {}
    cluster = cfg.get("cluster")
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    max_steps = train.get("max_steps")
    return {
        "cluster": cluster.get("name") if isinstance(cluster, dict) else cluster,
        "run_name": cfg.get("run_name"),
        "max_steps": max_steps if isinstance(max_steps, int) else None,
    }


def read_metrics_tail(path: Path, block: int = 64 * 1024) -> Dict[str, Any]:
    """The last train record (with "loss") and last eval_loss of metrics.jsonl, reading only the file's tail."""
    try:
        handle = open(path, "rb")
    except OSError:
        return {}
    with handle:
        size = os.fstat(handle.fileno()).st_size
        result: Dict[str, Any] = {}
        read = min(size, block)
        while True:
            handle.seek(size - read)
            lines = handle.read(read).split(b"\n")
            if read < size:
                lines = lines[1:]  # the first line may be cut
            for line in reversed(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:  # a line being written, or cut by a crash
                    continue
                if not isinstance(record, dict):
                    continue
                if "eval_loss" in record and "eval_loss" not in result:
                    result["eval_loss"] = record["eval_loss"]
                if "loss" in record and "train" not in result:
                    result["train"] = record
                if "train" in result and "eval_loss" in result:
                    return result
            if read >= size:
                return result
            read = min(size, read * 8)


def last_checkpoint(run_dir: Path) -> Optional[int]:
    """Step of the newest complete checkpoint (checkpoints/step-N/COMPLETE)."""
    steps = []
    try:
        for entry in os.scandir(run_dir / CHECKPOINTS_DIR):
            match = re.match(r"^step-(\d+)$", entry.name)
            if match and os.path.exists(os.path.join(entry.path, "COMPLETE")):
                steps.append(int(match.group(1)))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return max(steps) if steps else None


def log_path(run_dir: Path, job_id: str, task: int = 0) -> Path:
    return run_dir / SLURM_DIR / f"{job_id}_{task}_log.out"


def read_run(run_dir: Path, now: Optional[float] = None) -> Run:
    """Everything the run directory says (no Slurm)."""
    config = read_config(run_dir)
    attempts = read_attempts(run_dir / ATTEMPTS_LOG)
    job_ids = job_ids_of(run_dir, attempts)
    run = Run(
        name=run_dir.name, run_dir=str(run_dir), cluster=config.get("cluster"), job_ids=job_ids,
        job_id=sq.newest_job(job_ids), max_steps=config.get("max_steps"),
        export=(run_dir / EXPORT_DIR).is_dir(), last_checkpoint=last_checkpoint(run_dir),
    )
    metrics_path = run_dir / METRICS_FILE
    metrics = read_metrics_tail(metrics_path)
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
    if run.job_id is not None:
        run.log = str(log_path(run_dir, run.job_id))
        entry = attempts.get(run.job_id)
        if entry is not None:
            run.attempts_log = asdict(entry)
            run.attempt, run.attempt_source, run.requeues = entry.attempt or None, "attempts.log", entry.requeues
    run.state = derived_state(run, config_present=bool(config))
    return run


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


# -------------------------------------------------------------------------------------------------------- output


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def format_rate(value: Optional[float]) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


COLUMNS = ("RUN", "CLUSTER", "JOB", "STATE", "ATTEMPT", "STEP", "LOSS", "TOK/S", "ELAPSED", "EXPORT")


def row_cells(run: Run) -> List[str]:
    state = run.state
    if run.reason and state == "PENDING":
        state = f"PENDING ({run.reason})"
    if run.step is None and run.max_steps is None:
        step = "-"
    else:
        step = f"{run.step if run.step is not None else '-'}/{run.max_steps if run.max_steps is not None else '?'}"
    return [
        run.name,
        run.cluster or "-",
        run.job_id or "-",
        state,
        str(run.attempt) if run.attempt else "-",
        step,
        f"{run.loss:.4f}" if run.loss is not None else "-",
        format_rate(run.tokens_per_s),
        format_duration(run.elapsed_s),
        "yes" if run.export else "-",
    ]


def format_table(runs: Sequence[Run]) -> str:
    rows = [list(COLUMNS)] + [row_cells(run) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = {"ATTEMPT", "STEP", "LOSS", "TOK/S", "ELAPSED"}
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if name in numeric else cell.ljust(width)
            for cell, width, name in zip(row, widths, COLUMNS)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def to_json(runs: Sequence[Run], notes: Sequence[str]) -> str:
    rows = []
    for run in runs:
        row = asdict(run)
        row["elapsed_s"] = run.elapsed_s
        rows.append(row)
    return json.dumps({"runs": rows, "notes": list(notes)}, indent=2)


# -------------------------------------------------------------------------------------------------------- logs


def attempt_offset(path: Path, block: int = 1 << 20) -> int:
    """Byte offset of the last attempt's first line ("launcher: job J attempt N on ...") in a log; 0 if none."""
    try:
        handle = open(path, "rb")
    except OSError:
        return 0
    with handle:
        end = os.fstat(handle.fileno()).st_size
        carry = b""
        while end > 0:
            start = max(0, end - block)
            # One byte before the block shows whether the block starts a line.
            lead = 1 if start > 0 else 0
            handle.seek(start - lead)
            data = handle.read(end - start + lead) + carry
            matches = [m for m in _ATTEMPT_MARKER.finditer(data) if not (lead and m.start() == 0 and data[:1] != b"\n")]
            if matches:
                return start - lead + matches[-1].start(1)
            carry = data[lead:lead + 256]
            end = start
    return 0


def current_log(run_dir: Path, task: int = 0, job_id: Optional[str] = None) -> Tuple[Optional[str], Optional[Path]]:
    """(job id, log path) of the newest job (or job_id); the path may not exist yet (job pending)."""
    job = job_id or sq.newest_job(job_ids_of(run_dir, read_attempts(run_dir / ATTEMPTS_LOG)))
    if job is None:
        return None, None
    return job, log_path(run_dir, job, task)


def follow(
    locate: Callable[[], Optional[Path]],
    out: IO[bytes],
    *,
    offset: int = 0,
    poll_s: float = 0.5,
    rescan_s: float = 2.0,
    stop: Callable[[], bool] = lambda: False,
    notify: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> None:
    """tail -F: print what is appended to locate()'s file, across truncation and replacement, until stop().

    locate() is asked again every rescan_s: a newer job of the run (a resubmission) switches to its log. A requeue
    appends to the same file (the batch script opens it in append mode), so following simply goes on. Idle files
    are reopened every rescan_s, which makes NFS clients revalidate their cached size.
    """
    path = locate()
    handle: Optional[IO[bytes]] = None
    identity: Optional[Tuple[int, int]] = None  # (device, inode) of the file last opened
    position = offset
    waiting_for: Optional[Path] = None
    next_rescan = time.monotonic() + rescan_s
    try:
        while not stop():
            if handle is None and path is not None:
                try:
                    handle = open(path, "rb")
                except FileNotFoundError:
                    if waiting_for != path:
                        notify(f"launcher: waiting for {path} (the job has not started yet?)")
                        waiting_for = path
                else:
                    waiting_for = None
                    stat = os.fstat(handle.fileno())
                    opened = (stat.st_dev, stat.st_ino)
                    if identity is not None and opened != identity:
                        notify(f"launcher: {path} was replaced; following the new file from its start")
                        position = 0
                    elif stat.st_size < position:
                        notify(f"launcher: {path} was truncated; following from its start")
                        position = 0
                    identity = opened
                    handle.seek(position)
            if handle is not None:
                data = handle.read(1 << 16)
                if data:
                    out.write(data)
                    out.flush()
                    position += len(data)
                    continue
                try:
                    stat = os.stat(path)
                except FileNotFoundError:
                    stat = None  # removed: keep the open file until the next rescan, then wait for a new one
                if stat is not None and ((stat.st_dev, stat.st_ino) != identity or stat.st_size < position):
                    handle.close()
                    handle = None
                    continue
            if time.monotonic() >= next_rescan:
                next_rescan = time.monotonic() + rescan_s
                newer = locate()
                if newer is not None and newer != path:
                    notify(f"launcher: a newer job of the run: following {newer}")
                    if handle is not None:
                        handle.close()
                    handle, path, position, identity, waiting_for = None, newer, 0, None, None
                    continue
                if handle is not None:  # reopen an idle file (NFS close-to-open consistency)
                    handle.close()
                    handle = None
            time.sleep(poll_s)
    finally:
        if handle is not None:
            handle.close()


# -------------------------------------------------------------------------------------------------------- commands


def _run_dir_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise SystemExit(f"launcher: error: {text} is not a directory")
    if not is_run_dir(path):
        raise SystemExit(f"launcher: error: {text} is not a run directory (no config.yaml, job.sh or slurm/)")
    return path


def cmd_list(args: argparse.Namespace) -> int:
    directory = Path(args.dir).expanduser()
    if not directory.is_dir():
        print(f"launcher: error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    runs, notes = collect(directory)
    if args.json:
        print(to_json(runs, notes))
        return 0
    if not runs:
        print(f"launcher: no runs in {directory}")
    else:
        print(format_table(runs))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    run_dir = _run_dir_arg(args.run_dir)
    job, path = current_log(run_dir, args.task, args.job)
    if job is None or path is None:
        print(f"launcher: error: no Slurm job in {run_dir} (nothing in {run_dir / SLURM_DIR})", file=sys.stderr)
        return 1
    if not path.exists() and args.task == 0:
        # Logs written elsewhere (another file system, a changed --output): ask the controller.
        elsewhere = sq.job_stdout(job)
        if elsewhere and "%" not in elsewhere and Path(elsewhere).exists():
            path = Path(elsewhere)
    offset = 0 if args.all else attempt_offset(path)
    out = sys.stdout.buffer
    if not args.follow:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                while chunk := handle.read(1 << 20):
                    out.write(chunk)
        except FileNotFoundError:
            state = sq.job_states([job]).get(job)
            print(f"launcher: no log yet for job {job}{f' ({state.state})' if state else ''}: {path}", file=sys.stderr)
            return 1
        out.flush()
        return 0
    fixed = args.job is not None
    known = {"path": path}

    def locate() -> Optional[Path]:
        if not fixed:
            newest, newer_path = current_log(run_dir, args.task)
            if newest is not None and newest != job:
                known["path"] = newer_path
        return known["path"]

    try:
        follow(locate, out, offset=offset)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    run_dir = _run_dir_arg(args.run_dir)
    job = args.job or sq.newest_job(job_ids_of(run_dir, read_attempts(run_dir / ATTEMPTS_LOG)))
    if job is None:
        print(f"launcher: error: no Slurm job in {run_dir}: nothing to cancel", file=sys.stderr)
        return 1
    before = sq.job_states([job]).get(job)
    if before is not None and before.final:
        print(f"launcher: job {job} of run {run_dir.name} is already {before.state}; nothing cancelled")
        return 0
    try:
        sq.cancel_job(job)
    except sq.SlurmError as error:
        print(f"launcher: error: {error}", file=sys.stderr)
        return 1
    was = f", was {before.state}" if before is not None else ""
    print(f"launcher: cancelled job {job} (run {run_dir.name}{was})")
    return 0


def _parsers() -> Dict[str, argparse.ArgumentParser]:
    prog = "python -m launcher.status"
    listing = argparse.ArgumentParser(
        prog=prog, description="One row per run: Slurm state, attempt, progress, export. "
        f"Also: '{prog} logs RUN_DIR' and '{prog} cancel RUN_DIR'.",
    )
    listing.add_argument("dir", nargs="?", default=DEFAULT_DIR, help="a directory of runs or one run (default ./runs)")
    listing.add_argument("--json", action="store_true", help="print JSON: {\"runs\": [...], \"notes\": [...]}")
    logs = argparse.ArgumentParser(prog=f"{prog} logs", description="Print the current attempt's log of a run.")
    logs.add_argument("run_dir")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended (Ctrl-C stops)")
    logs.add_argument("--task", type=int, default=0, help="Slurm task (rank) whose log to show (default 0)")
    logs.add_argument("--job", help="this job id instead of the run's newest")
    logs.add_argument("--all", action="store_true", help="the whole file, every attempt, not the current one only")
    cancel = argparse.ArgumentParser(prog=f"{prog} cancel", description="scancel the run's newest job.")
    cancel.add_argument("run_dir")
    cancel.add_argument("--job", help="this job id instead of the run's newest")
    return {"list": listing, "logs": logs, "cancel": cancel}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parsers = _parsers()
    # A directory of runs literally named "logs" or "cancel" is listed as ./logs or ./cancel.
    command = argv[0] if argv and argv[0] in ("logs", "cancel") else "list"
    args = parsers[command].parse_args(argv[1:] if command != "list" else argv)
    handler = {"list": cmd_list, "logs": cmd_logs, "cancel": cmd_cancel}[command]
    try:
        return handler(args)
    except BrokenPipeError:  # piped into head
        return 0

