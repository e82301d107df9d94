"""The listing's output: the aligned table and the --json document."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import List, Optional, Sequence

from launcher.cli_errors import clean
from launcher.status.runs import Run

COLUMNS = ("RUN", "CLUSTER", "JOB", "STATE", "ATTEMPT", "STEP", "LOSS", "TOK/S", "ELAPSED", "EXPORT")
PROBLEM_COLUMN = "PROBLEM"  # only when a run has a file that could not be (fully) read; the notes say more
PROBLEM_MAX_CHARS = 60
EVAL_COLUMN = "EVAL"  # only when a run has an evaluation (python -m launcher.evaluate): its newest scores
_NUMERIC = {"ATTEMPT", "STEP", "LOSS", "TOK/S", "ELAPSED"}  # right-aligned


def format_duration(seconds: Optional[float]) -> str:
    """H:MM:SS, or D-HH:MM:SS from one day on (Slurm's style); "-" for None."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def format_rate(value: Optional[float]) -> str:
    """950, 12.3k, 1.2M, 3.4G; "-" for None."""
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def problem_cell(run: Run) -> str:
    """The files of the run that could not be read, in a few words ("-" when none)."""
    if not run.problems:
        return "-"
    files = []
    for problem in run.problems:
        name = problem.split(":", 1)[0]
        if name not in files:
            files.append(name)
    text = f"{', '.join(files)} (see notes)"
    return text if len(text) <= PROBLEM_MAX_CHARS else text[: PROBLEM_MAX_CHARS - 3] + "..."


def row_cells(run: Run) -> List[str]:
    """One row's cells, in COLUMNS order, without terminal control characters (names come from the file system
    and from config files)."""
    return [clean(cell) or "?" for cell in _raw_cells(run)]


def _raw_cells(run: Run) -> List[str]:
    state = run.state
    if run.reason and state == "PENDING":
        state = f"PENDING ({run.reason})"
    state = _fault_state(run, state)
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


# Slurm states in which the job is still alive: a hang of an earlier attempt only adds to them.
_ALIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


def _fault_state(run: Run, state: str) -> str:
    """HUNG at step N (rank r on host) when the newest attempt hung; a straggler warning adds "straggler: rank r"."""
    hang = run.hang
    if hang and not run.export:
        text = f"HUNG at step {hang.get('step')} (rank {hang.get('rank')} on {hang.get('host')})"
        state = f"{state}, last attempt {text}" if state.split(" ")[0] in _ALIVE else text
    straggler = run.straggler
    if straggler and straggler.get("warning"):
        state += (f" (straggler: rank {straggler.get('slowest_rank')} on {straggler.get('slowest_host')}, "
                  f"{straggler.get('straggler_ratio', 0):.2f}x)")
    return state


def format_table(runs: Sequence[Run]) -> str:
    """The header and one line per run, columns aligned (numbers to the right); a PROBLEM column when a run has
    files that could not be read."""
    columns = list(COLUMNS)
    rows = [row_cells(run) for run in runs]
    if any(run.scores for run in runs):
        from launcher.evaluate import format_scores

        columns.append(EVAL_COLUMN)
        rows = [row + [clean(f"{run.scores.get('name')}: {format_scores(run.scores)}") if run.scores else "-"]
                for row, run in zip(rows, runs)]
    if any(run.problems for run in runs):
        columns.append(PROBLEM_COLUMN)
        rows = [row + [clean(problem_cell(run))] for row, run in zip(rows, runs)]
    rows.insert(0, columns)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if name in _NUMERIC else cell.ljust(width)
            for cell, width, name in zip(row, widths, columns)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def to_json(runs: Sequence[Run], notes: Sequence[str]) -> str:
    """{"runs": [every Run field plus elapsed_s], "notes": [...]}."""
    rows = []
    for run in runs:
        row = asdict(run)
        row["elapsed_s"] = run.elapsed_s
        rows.append(row)
    return json.dumps({"runs": rows, "notes": list(notes)}, indent=2)
