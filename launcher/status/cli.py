"""The command line: list runs, print or follow a run's log, cancel a run's job.

    python -m launcher.status [DIR] [--json]              DIR: a directory of runs (default ./runs) or one run
    python -m launcher.status logs RUN_DIR [--follow] [--task N] [--job ID] [--all]
    python -m launcher.status cancel RUN_DIR [--job ID]

See docs/status.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from launcher import rundir
from launcher.cli_errors import ArgumentParser, clean, run_cli
from launcher.errors import UserError
from launcher.slurm import query as sq
from launcher.status.follow import attempt_offset, current_log, follow
from launcher.status.runs import STRICT_JOB_ID, collect, job_ids_of, newest_job_of, read_attempts
from launcher.status.safe import CleanOutput, NotRegularFile, inside, open_regular, problem_of, regular_problem
from launcher.status.table import format_table, to_json

DEFAULT_DIR = "./runs"
PROG = "python -m launcher.status"
RUN_DIR_ALLOWED = f"a run directory: one holding {', '.join(rundir.RUN_MARKERS)}"


def _run_dir_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UserError("RUN_DIR", text, "not a directory", RUN_DIR_ALLOWED)
    if not rundir.is_run_dir(path):
        raise UserError("RUN_DIR", text, "not a run directory", RUN_DIR_ALLOWED)
    return path


def _job_arg(run_dir: Path, job: Optional[str]) -> Optional[str]:
    """--job: a job id of this run (from slurm/ or logs/attempts.log), or None for the newest."""
    if job is None:
        return None
    if not STRICT_JOB_ID.fullmatch(job):
        raise UserError("--job", job, "not a Slurm job id", "digits, or <array id>_<index> (e.g. 4711 or 4711_3)")
    known = job_ids_of(run_dir, read_attempts(run_dir / rundir.ATTEMPTS_LOG))
    if job not in known:
        raise UserError("--job", job, f"not a job of run {run_dir.name}",
                        f"one of: {', '.join(known)}" if known else "the run has no Slurm job yet")
    return job


def _log_arg(run_dir: Path, path: Path, option: str) -> Path:
    """The log path, refused when it leads out of the run directory or is not a regular file (a FIFO would block)."""
    if not inside(path, run_dir):
        raise UserError(option, str(path), "leads outside the run directory (a symlink?)",
                        f"a regular file inside {run_dir}")
    problem = regular_problem(path)
    if problem:
        raise UserError(option, str(path), problem, f"a regular file inside {run_dir}")
    return path


def cmd_list(args: argparse.Namespace) -> int:
    """The table (or --json) of DIR's runs; notes go to stderr."""
    directory = Path(args.dir).expanduser()
    if not directory.is_dir():
        raise UserError("DIR", args.dir, "not a directory", "a directory of runs (default ./runs) or one run directory")
    runs, notes = collect(directory)
    if args.json:
        print(to_json(runs, notes))
        return 0
    if not runs:
        print(f"launcher: no runs in {clean(directory)}")
    else:
        print(format_table(runs))
    for note in notes:
        print(f"note: {clean(note)}", file=sys.stderr)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the current attempt's log (--all: the whole file), or follow it (--follow)."""
    run_dir = _run_dir_arg(args.run_dir)
    if args.task < 0:
        raise UserError("--task", args.task, "not a task number", "0 (rank 0, the default) or another rank, >= 0")
    job, path = current_log(run_dir, args.task, _job_arg(run_dir, args.job))
    if job is None or path is None:
        print(f"launcher: error: no Slurm job in {clean(run_dir)} (nothing in {clean(run_dir / rundir.SLURM_DIR)})",
              file=sys.stderr)
        return 1
    if not path.exists() and args.task == 0:
        _say_where_the_controller_writes(run_dir, job)
    path = _log_arg(run_dir, path, "log")
    out = sys.stdout.buffer if args.raw else CleanOutput(sys.stdout.buffer)
    offset = 0 if args.all else attempt_offset(path)
    if not args.follow:
        return _print_log(job, path, offset, out)
    fixed = args.job is not None
    known = {"path": path}

    def locate() -> Optional[Path]:
        if not fixed:
            newest, newer_path = current_log(run_dir, args.task)
            if newest is not None and newest != job:
                known["path"] = newer_path
        return known["path"]

    def refuse(candidate: Path) -> Optional[str]:
        return None if inside(candidate, run_dir) else "leads outside the run directory"

    try:
        follow(locate, out, offset=offset, refuse=refuse)
    except KeyboardInterrupt:
        pass
    return 0


def _say_where_the_controller_writes(run_dir: Path, job: str) -> None:
    """Logs written elsewhere (another file system, a changed --output): say where; only the run directory is read."""
    elsewhere = sq.job_stdout(job)
    if elsewhere and "%" not in elsewhere and not inside(Path(elsewhere), run_dir):
        print(f"launcher: job {job} writes its log to {clean(elsewhere)}, outside the run directory: not read here",
              file=sys.stderr)


def _print_log(job: str, path: Path, offset: int, out) -> int:
    """The log from offset on; 1 (and the job's state) when it does not exist yet."""
    try:
        with open_regular(path) as handle:
            handle.seek(offset)
            while chunk := handle.read(1 << 20):
                out.write(chunk)
    except FileNotFoundError:
        state = sq.job_states([job]).get(job)
        print(f"launcher: no log yet for job {job}{f' ({clean(state.state)})' if state else ''}: {clean(path)}",
              file=sys.stderr)
        return 1
    except (NotRegularFile, OSError) as error:
        raise UserError("log", str(path), problem_of(error), "a readable regular file inside the run directory")
    if isinstance(out, CleanOutput):
        out.close()
    out.flush()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """scancel the run's newest job (or --job), unless it already finished."""
    run_dir = _run_dir_arg(args.run_dir)
    job = _job_arg(run_dir, args.job) or newest_job_of(run_dir)
    if job is None:
        print(f"launcher: error: no Slurm job in {clean(run_dir)}: nothing to cancel", file=sys.stderr)
        return 1
    name = clean(run_dir.name)
    before = sq.job_states([job]).get(job)
    if before is not None and before.final:
        print(f"launcher: job {job} of run {name} is already {clean(before.state)}; nothing cancelled")
        return 0
    try:
        sq.cancel_job(job)
    except sq.SlurmError as error:
        print(f"launcher: error: {clean(error)}", file=sys.stderr)
        return 1
    was = f", was {clean(before.state)}" if before is not None else ""
    print(f"launcher: cancelled job {job} (run {name}{was})")
    return 0


def _parsers() -> Dict[str, argparse.ArgumentParser]:
    listing = ArgumentParser(
        prog=PROG, description="One row per run: Slurm state, attempt, progress, export. "
        f"Also: '{PROG} logs RUN_DIR' and '{PROG} cancel RUN_DIR'.",
    )
    listing.add_argument("dir", nargs="?", default=DEFAULT_DIR, help="a directory of runs or one run (default ./runs)")
    listing.add_argument("--json", action="store_true", help="print JSON: {\"runs\": [...], \"notes\": [...]}")
    logs = ArgumentParser(prog=f"{PROG} logs", description="Print the current attempt's log of a run.")
    logs.add_argument("run_dir")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended (Ctrl-C stops)")
    logs.add_argument("--task", type=int, default=0, help="Slurm task (rank) whose log to show (default 0)")
    logs.add_argument("--job", help="this job id of the run instead of its newest")
    logs.add_argument("--all", action="store_true", help="the whole file, every attempt, not the current one only")
    logs.add_argument("--raw", action="store_true",
                      help="print the log's bytes as they are (default: without terminal control sequences)")
    cancel = ArgumentParser(prog=f"{PROG} cancel", description="scancel the run's newest job.")
    cancel.add_argument("run_dir")
    cancel.add_argument("--job", help="this job id of the run instead of its newest")
    return {"list": listing, "logs": logs, "cancel": cancel}


def _main(argv: List[str]) -> int:
    parsers = _parsers()
    # A directory of runs literally named "logs" or "cancel" is listed as ./logs or ./cancel.
    command = argv[0] if argv and argv[0] in ("logs", "cancel") else "list"
    args = parsers[command].parse_args(argv[1:] if command != "list" else argv)
    handler = {"list": cmd_list, "logs": cmd_logs, "cancel": cmd_cancel}[command]
    return handler(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of python -m launcher.status; returns the exit status (2: bad input, one line; 1: no job, a
    failed scancel, or an internal error whose traceback went to a file)."""
    return run_cli(_main, argv)
