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
from typing import Dict, Optional, Sequence

from launcher import rundir
from launcher.slurm import query as sq
from launcher.status.follow import attempt_offset, current_log, follow
from launcher.status.runs import collect, newest_job_of
from launcher.status.table import format_table, to_json

DEFAULT_DIR = "./runs"
PROG = "python -m launcher.status"


def _run_dir_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise SystemExit(f"launcher: error: {text} is not a directory")
    if not rundir.is_run_dir(path):
        raise SystemExit(f"launcher: error: {text} is not a run directory (no config.yaml, job.sh or slurm/)")
    return path


def cmd_list(args: argparse.Namespace) -> int:
    """The table (or --json) of DIR's runs; notes go to stderr."""
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
    """Print the current attempt's log (--all: the whole file), or follow it (--follow)."""
    run_dir = _run_dir_arg(args.run_dir)
    job, path = current_log(run_dir, args.task, args.job)
    if job is None or path is None:
        print(f"launcher: error: no Slurm job in {run_dir} (nothing in {run_dir / rundir.SLURM_DIR})", file=sys.stderr)
        return 1
    if not path.exists() and args.task == 0:
        # Logs written elsewhere (another file system, a changed --output): ask the controller.
        elsewhere = sq.job_stdout(job)
        if elsewhere and "%" not in elsewhere and Path(elsewhere).exists():
            path = Path(elsewhere)
    offset = 0 if args.all else attempt_offset(path)
    if not args.follow:
        return _print_log(job, path, offset)
    fixed = args.job is not None
    known = {"path": path}

    def locate() -> Optional[Path]:
        if not fixed:
            newest, newer_path = current_log(run_dir, args.task)
            if newest is not None and newest != job:
                known["path"] = newer_path
        return known["path"]

    try:
        follow(locate, sys.stdout.buffer, offset=offset)
    except KeyboardInterrupt:
        pass
    return 0


def _print_log(job: str, path: Path, offset: int) -> int:
    """The log from offset on; 1 (and the job's state) when it does not exist yet."""
    out = sys.stdout.buffer
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


def cmd_cancel(args: argparse.Namespace) -> int:
    """scancel the run's newest job (or --job), unless it already finished."""
    run_dir = _run_dir_arg(args.run_dir)
    job = args.job or newest_job_of(run_dir)
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
    listing = argparse.ArgumentParser(
        prog=PROG, description="One row per run: Slurm state, attempt, progress, export. "
        f"Also: '{PROG} logs RUN_DIR' and '{PROG} cancel RUN_DIR'.",
    )
    listing.add_argument("dir", nargs="?", default=DEFAULT_DIR, help="a directory of runs or one run (default ./runs)")
    listing.add_argument("--json", action="store_true", help="print JSON: {\"runs\": [...], \"notes\": [...]}")
    logs = argparse.ArgumentParser(prog=f"{PROG} logs", description="Print the current attempt's log of a run.")
    logs.add_argument("run_dir")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended (Ctrl-C stops)")
    logs.add_argument("--task", type=int, default=0, help="Slurm task (rank) whose log to show (default 0)")
    logs.add_argument("--job", help="this job id instead of the run's newest")
    logs.add_argument("--all", action="store_true", help="the whole file, every attempt, not the current one only")
    cancel = argparse.ArgumentParser(prog=f"{PROG} cancel", description="scancel the run's newest job.")
    cancel.add_argument("run_dir")
    cancel.add_argument("--job", help="this job id instead of the run's newest")
    return {"list": listing, "logs": logs, "cancel": cancel}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of python -m launcher.status; returns the exit status."""
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
