"""Reading a point's ``metrics.jsonl`` and ``environment.json`` without trusting them.

A file that is not a regular file (a FIFO would block the read), not JSON, or cut by a crash never stops the report:
``read_records`` skips the lines it cannot use and says so (``warnings``); a value that is not a finite number
(``NaN``, ``Infinity``, a string, a list, ``true``) is left out of its record, so that a record without a usable
``step`` or ``tokens_per_s`` is not a training record. ``read_fingerprint`` keeps the fields the report prints only
when they have the type it prints.

Stdlib and ``launcher.status.safe`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from launcher import rundir
from launcher.cli_errors import show
from launcher.status.safe import NUMBER_LIMIT, is_finite_number, open_regular, parse_record, problem_of, read_limited

# Fields of a metrics record that the report computes with: each must be a finite number when present.
NUMERIC_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "step_time_s",
                  "peak_mem_gb", "tokens", "elapsed_s", "world_size", "eval_loss")
FINGERPRINT_MAX_BYTES = 1 << 20
# Fingerprint fields the report prints (markdown.FINGERPRINT_FIELDS, Point.job_id, ...), and the type each must have.
FINGERPRINT_TYPES: Dict[str, Tuple[type, ...]] = {
    **{key: (str,) for key in ("git_commit", "container_image", "container_digest", "torch", "hip", "cuda", "nccl",
                               "deepspeed", "transformers", "python", "job_id", "nodelist")},
    "git_dirty": (bool,), "world_size": (int,),
}


def _drop_bad_values(record: Dict[str, Any], line_no: int, bad: List[str]) -> Dict[str, Any]:
    for key in NUMERIC_FIELDS:
        if key in record and record[key] is not None and not is_finite_number(record[key]):
            bad.append(f"line {line_no} {key}={show(record.pop(key), 40)}")  # NaN, inf, a string, a list, true
    return record


def read_records(path: Path) -> Tuple[List[Dict[str, Any]], List[str], Optional[str]]:
    """(records, warnings, None), or ([], [], why) when the file exists but cannot be read. Absent: ([], [], None)."""
    name = rundir.METRICS_FILE
    try:
        handle = open_regular(path)
    except FileNotFoundError:
        return [], [], None
    except OSError as error:
        return [], [], problem_of(error)
    records: List[Dict[str, Any]] = []
    skipped: List[int] = []
    bad: List[str] = []
    cut = False
    with handle:
        line_no = 0
        for line_no, line in enumerate(handle, 1):
            record = parse_record(line)
            if record is not None:
                records.append(_drop_bad_values(record, line_no, bad))
            elif line.strip():
                if line.endswith(b"\n"):
                    skipped.append(line_no)
                else:
                    cut = True  # the last line, cut mid-write
    warnings = []
    if cut:
        warnings.append(f"{name}: the last line is cut (a crash mid-write?): ignored")
    if skipped:
        warnings.append(f"{name}: {len(skipped)} line(s) that are not JSON objects skipped (first: line {skipped[0]})")
    if bad:
        warnings.append(f"{name}: {len(bad)} value(s) that are not finite numbers below {NUMBER_LIMIT:g} left out "
                        f"(first: {bad[0]})")
    return records, warnings, None


def read_fingerprint(run_dir: Path) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """(environment.json as a dict, warnings); None when absent or unreadable (a warning says why, unless absent)."""
    name = rundir.FINGERPRINT_FILE
    try:
        data = json.loads(read_limited(Path(run_dir) / name, FINGERPRINT_MAX_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return None, []
    except (OSError, ValueError, RecursionError) as error:
        return None, [f"{name}: {problem_of(error)}: ignored"]
    if not isinstance(data, dict):
        return None, [f"{name}: not a JSON object: ignored"]
    wrong = [key for key, types in FINGERPRINT_TYPES.items()
             if data.get(key) is not None and (not isinstance(data[key], types) or
                                               (types == (int,) and isinstance(data[key], bool)))]
    for key in wrong:
        data.pop(key)
    return data, [f"{name}: {', '.join(wrong)} of the wrong type: left out"] if wrong else []
