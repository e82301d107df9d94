"""Hung and straggling runs, for the status listing: the watchdog's stack files and the straggler report.

    hangs/attempt-N/rank-<r>.txt   a "key: value" header (launcher/train/watchdog.py), "---", then the stacks
    metrics.jsonl                  {"event": "stragglers", "slowest_rank", "slowest_host", "straggler_ratio", ...}

Stdlib only (the login node); see docs/hangs.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher import rundir
from launcher.status.safe import is_finite_number, open_regular


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def straggler_of(record: Any) -> Optional[Dict[str, Any]]:
    """The straggler report's fields, or None (no report, or a record of the wrong shape)."""
    if not isinstance(record, dict) or not is_finite_number(record.get("straggler_ratio")):
        return None
    rank = record.get("slowest_rank")
    return {"step": record.get("step") if isinstance(record.get("step"), int) else None,
            "slowest_rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
            "slowest_host": _text(record.get("slowest_host")), "straggler_ratio": float(record["straggler_ratio"]),
            "warning": _text(record.get("straggler_warning")), "streak": record.get("straggler_streak")}


_HANG_ATTEMPT = re.compile(r"attempt-([0-9]+)")
_STACK_FILE = re.compile(r"rank-([0-9]+)\.txt")
HANG_HEADER_MAX_BYTES = 8192


def _hang_header(path: Path) -> Dict[str, str]:
    """The "key: value" lines before "---" of a stack file (launcher/train/watchdog.py writes them)."""
    try:
        text = _read_head_text(path, HANG_HEADER_MAX_BYTES)
    except OSError:
        return {}
    header: Dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() == "---":
            break
        key, sep, value = line.partition(": ")
        if sep:
            header[key.strip()] = value.strip()
    return header


def _read_head_text(path: Path, limit: int) -> str:
    with open_regular(path) as handle:
        return handle.read(limit).decode("utf-8", errors="replace")


def read_hang(run_dir: Path, logged_step: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The newest attempt's hang (the stack file of the rank that knows it is the cause, else the lowest rank);
    None when there is none, or when training logged a later step since (an older attempt's hang)."""
    try:
        attempts = [(int(m.group(1)), Path(e.path)) for e in os.scandir(run_dir / rundir.HANGS_DIR)
                    if (m := _HANG_ATTEMPT.fullmatch(e.name)) and e.is_dir()]
    except OSError:
        return None
    for attempt, directory in sorted(attempts, reverse=True):
        try:
            files = sorted((int(m.group(1)), Path(e.path)) for e in os.scandir(directory)
                           if (m := _STACK_FILE.fullmatch(e.name)))
        except OSError:
            continue
        if not files:
            continue
        headers = [(rank, path, _hang_header(path)) for rank, path in files]
        rank, path, header = next((h for h in headers if not h[2].get("cause", "").startswith("not known")),
                                  headers[0])
        last = header.get("last completed step", "")
        last_step = int(last) if last.isdigit() else None
        if logged_step is not None and (last_step or 0) < logged_step:
            return None
        stopped = header.get("stopped in step", "")
        return {"step": int(stopped) if stopped.isdigit() else None, "last_step": last_step, "rank": rank,
                "host": header.get("host"), "phase": header.get("phase"), "cause": header.get("cause"),
                "reason": header.get("reason"), "file": str(path), "attempt": attempt, "ranks": len(files)}
    return None


def hang_notes(run: Any) -> List[str]:
    """What the notes say about a hung or straggling run."""
    notes = []
    if run.hang:
        hang = run.hang
        notes.append(f"{run.name}: hung at step {hang['step']} (attempt {hang['attempt']}, rank {hang['rank']} on "
                     f"{hang['host']}, phase {hang['phase']}; cause: {hang['cause']}): stacks in {hang['file']}")
    if run.straggler and run.straggler.get("warning"):
        notes.append(f"{run.name}: {run.straggler['warning']}")
    return notes
