"""Job states from Slurm for the login node: pure parsers of sacct/squeue/scontrol output, thin subprocess wrappers.

Standard library only. The parsers take the text a command printed and return ``{job id: JobState}``; the wrappers
run one command with a timeout; ``query_jobs``/``job_states`` combine them:

1. ``sacct -D -X -n -P -j IDS -o JobID,State,ExitCode,Elapsed``: one call for every id. ``-D`` keeps one row per
   attempt of a requeued job, so the number of rows gives the restart count (sacct of Slurm 22.05 has no
   ``Restarts`` field). Fails where accounting is disabled ("Slurm accounting storage is disabled") or slurmdbd is
   unreachable.
2. ``squeue -h -t all -j IDS -O JobArrayID,State,RestartCnt,TimeUsed,Reason``: the controller's view, asked only for
   the ids sacct did not answer (not yet in the database, or sacct failed) or answered with a state that may still
   change. The controller is always current; sacct lags a second or two behind it.
3. ``scontrol show job -o ID``, one call per id, only when squeue itself failed.

Job ids are strings: ``"123"``, or ``"123_4"`` for task 4 of array job 123. A pending array may be reported as one
record ``"123_[0-7%2]"``; the lookup resolves ``"123_4"`` to it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# Seconds one Slurm command may take (a busy slurmdbd answers sacct slowly; the controller answers squeue quickly).
SACCT_TIMEOUT_S = 15.0
SQUEUE_TIMEOUT_S = 10.0
SCONTROL_TIMEOUT_S = 5.0
SCANCEL_TIMEOUT_S = 15.0
# scontrol answers one job per call: never more than this many calls in one query.
MAX_SCONTROL_CALLS = 20

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed")
SQUEUE_FIELDS = ("JobArrayID", "State", "RestartCnt", "TimeUsed", "Reason")

# States after which a job never runs again (a requeue always passes through REQUEUED/PENDING first).
FINAL_STATES = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED"}
)
# Abbreviations of squeue's %t, for completeness when a recorded output uses them.
_SHORT_STATES = {
    "PD": "PENDING", "R": "RUNNING", "CG": "COMPLETING", "CD": "COMPLETED", "CA": "CANCELLED", "F": "FAILED",
    "TO": "TIMEOUT", "OOM": "OUT_OF_MEMORY", "NF": "NODE_FAIL", "PR": "PREEMPTED", "S": "SUSPENDED",
    "RQ": "REQUEUED", "RH": "REQUEUE_HOLD", "RF": "REQUEUE_FED", "CF": "CONFIGURING", "BF": "BOOT_FAIL",
    "DL": "DEADLINE", "SE": "SPECIAL_EXIT", "ST": "STOPPED", "SO": "STAGE_OUT", "SI": "SIGNALING", "RS": "RESIZING",
    "RV": "REVOKED", "RD": "RESV_DEL_HOLD",
}

JOB_ID_PATTERN = r"\d+(?:_\d+)?"
_JOB_ID = re.compile(rf"^{JOB_ID_PATTERN}$")
_ARRAY_RECORD = re.compile(r"^(\d+)_\[([^\]]*)\]$")
_DISABLED = re.compile(r"accounting storage is disabled", re.IGNORECASE)
_INVALID_JOB = re.compile(r"invalid job id", re.IGNORECASE)


class SlurmError(RuntimeError):
    """A Slurm command is missing, timed out, or failed; the message names the command and what it printed."""


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # normalized: "CANCELLED by 1000" -> "CANCELLED", "PD" -> "PENDING"
    restarts: Optional[int] = None  # times Slurm requeued the job (None: this source does not say)
    exit_code: Optional[str] = None  # "0:0" = exit status:signal
    elapsed: Optional[str] = None  # as Slurm prints it: [D-][HH:]MM:SS
    reason: Optional[str] = None  # why a job is pending ("Resources", "Priority", ...)
    source: str = ""  # sacct | squeue | scontrol

    @property
    def attempt(self) -> Optional[int]:
        """1 for the first run of the job, 2 after one requeue, ... (LAUNCHER_ATTEMPT in the batch script)."""
        return None if self.restarts is None else self.restarts + 1

    @property
    def final(self) -> bool:
        return is_final(self.state)

    @property
    def elapsed_s(self) -> Optional[int]:
        return duration_seconds(self.elapsed)


@dataclass
class Query:
    """What ``query_jobs`` learned: the states found, and why some source could not answer."""

    states: Dict[str, JobState] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)
    slurm_available: bool = True
    sources: List[str] = field(default_factory=list)  # the commands that answered, in order

    def get(self, job_id: str) -> Optional[JobState]:
        return lookup(self.states, job_id)


# ------------------------------------------------------------------------------------------------------- job ids


def is_job_id(text: str) -> bool:
    return bool(_JOB_ID.match(text))


def job_sort_key(job_id: str) -> Tuple[int, int]:
    """Order of submission: 123 < 123_0 < 123_1 < 124."""
    base, _, index = job_id.partition("_")
    return int(base), int(index) if index else -1


def newest_job(job_ids: Iterable[str]) -> Optional[str]:
    ids = [job_id for job_id in job_ids if is_job_id(job_id)]
    return max(ids, key=job_sort_key) if ids else None


def expand_array_tasks(spec: str) -> set:
    """Task indices of an array spec as Slurm prints it: "0-7", "1,3,5-9", "0-15:4", "0-99%10"."""
    tasks: set = set()
    spec = spec.split("%", 1)[0]
    for part in filter(None, spec.split(",")):
        match = re.match(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$", part.strip())
        if not match:
            continue
        start, stop, step = match.groups()
        first = int(start)
        last = int(stop) if stop is not None else first
        if last - first > 1_000_000:  # nonsense: never build a huge set
            continue
        tasks.update(range(first, last + 1, int(step or 1)))
    return tasks


def lookup(states: Dict[str, JobState], job_id: str) -> Optional[JobState]:
    """The state of job_id: its own record, or for "123_4" the pending-array record "123_[...]" holding task 4."""
    if job_id in states:
        return states[job_id]
    base, _, index = job_id.partition("_")
    if not index:
        return None
    for key, state in states.items():
        match = _ARRAY_RECORD.match(key)
        if match and match.group(1) == base and int(index) in expand_array_tasks(match.group(2)):
            return JobState(job_id, state.state, state.restarts, state.exit_code, state.elapsed, state.reason,
                            state.source)
    return None


# ---------------------------------------------------------------------------------------------- values and parsers


def normalize_state(raw: str) -> str:
    """Slurm's state without decorations: "CANCELLED by 0" -> "CANCELLED", "COMPLETING+" -> "COMPLETING"."""
    words = raw.strip().split()
    if not words:
        return "UNKNOWN"
    state = words[0].rstrip("+*").upper()
    return _SHORT_STATES.get(state, state)


def is_final(state: str) -> bool:
    return normalize_state(state) in FINAL_STATES


def duration_seconds(text: Optional[str]) -> Optional[int]:
    """Seconds of an elapsed time as sacct/squeue/scontrol print it: "MM:SS", "H:MM:SS", "D-HH:MM:SS"."""
    if not text:
        return None
    match = re.match(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$", text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _none_if_blank(value: str) -> Optional[str]:
    value = value.strip()
    return None if value in ("", "None", "(null)", "N/A") else value


def _int_or_none(value: str) -> Optional[int]:
    value = value.strip()
    return int(value) if value.isdigit() else None


def check_sacct_output(stdout: str, stderr: str, returncode: int) -> None:
    """Raise SlurmError when sacct could not answer (accounting disabled, slurmdbd down, bad option)."""
    text = f"{stderr}\n{stdout}"
    if _DISABLED.search(text):
        raise SlurmError("sacct: Slurm accounting storage is disabled on this cluster")
    if returncode != 0:
        raise SlurmError(f"sacct failed (exit {returncode}): {_first_line(stderr or stdout)}")


def parse_sacct(text: str) -> Dict[str, JobState]:
    """``sacct -D -X -n -P -o JobID,State,ExitCode,Elapsed``: one row per attempt; the current row wins.

    A requeued job has a row per earlier attempt (state REQUEUED, or PREEMPTED/NODE_FAIL when Slurm requeued it) and
    one for the current attempt; restarts = rows - 1.
    """
    rows: Dict[str, List[List[str]]] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 2 or not fields[0].strip():
            continue
        fields += [""] * (len(SACCT_FIELDS) - len(fields))
        job_id = fields[0].strip()
        if "." in job_id:  # a step (batch, extern, 0): -X should have left it out
            continue
        rows.setdefault(job_id, []).append(fields)
    states = {}
    for job_id, attempts in rows.items():
        current = [row for row in attempts if normalize_state(row[1]) != "REQUEUED"] or attempts
        _, state, exit_code, elapsed = current[-1][:4]
        states[job_id] = JobState(
            job_id, normalize_state(state), restarts=len(attempts) - 1, exit_code=_none_if_blank(exit_code),
            elapsed=_none_if_blank(elapsed), source="sacct",
        )
    return states


def parse_squeue(text: str) -> Dict[str, JobState]:
    """``squeue -h -O JobArrayID:|,State:|,RestartCnt:|,TimeUsed:|,Reason:|``, or the shorter ``-o '%i|%T|%M|%r'``."""
    states = {}
    for line in text.splitlines():
        fields = [value.strip() for value in line.split("|")]
        if len(fields) < 2 or not fields[0]:
            continue
        job_id = fields[0]
        if len(fields) >= 5:
            restarts, elapsed, reason = _int_or_none(fields[2]), fields[3], fields[4]
        else:  # '%i|%T|%M|%r'
            restarts, elapsed, reason = None, fields[2] if len(fields) > 2 else "", fields[3] if len(fields) > 3 else ""
        states[job_id] = JobState(
            job_id, normalize_state(fields[1]), restarts=restarts, elapsed=_none_if_blank(elapsed),
            reason=_none_if_blank(reason), source="squeue",
        )
    return states


_SCONTROL_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:.]*)=")


def parse_scontrol_record(line: str) -> Dict[str, str]:
    """One line of ``scontrol show job -o`` as a dict; a value may hold spaces (Comment=a b, Command=x y)."""
    matches = list(_SCONTROL_KEY.finditer(line))
    record = {}
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following is not None else len(line)
        record[match.group(1)] = line[match.end():end].strip()
    return record


def parse_scontrol(text: str) -> Dict[str, JobState]:
    """``scontrol show job -o [ID]``: one job per line (without -o, records are separated by blank lines)."""
    records = text.strip().split("\n\n") if "\n\n" in text.strip() else text.splitlines()
    states = {}
    for chunk in records:
        record = parse_scontrol_record(" ".join(chunk.split("\n")))
        if "JobId" not in record or "JobState" not in record:
            continue
        job_id = record["JobId"]
        array_task = _none_if_blank(record.get("ArrayTaskId", ""))
        if array_task is not None and record.get("ArrayJobId"):
            task_ids = array_task if re.match(r"^\d+$", array_task) else f"[{array_task}]"
            job_id = f"{record['ArrayJobId']}_{task_ids}"
        states[job_id] = JobState(
            job_id, normalize_state(record["JobState"]), restarts=_int_or_none(record.get("Restarts", "")),
            exit_code=_none_if_blank(record.get("ExitCode", "")), elapsed=_none_if_blank(record.get("RunTime", "")),
            reason=_none_if_blank(record.get("Reason", "")), source="scontrol",
        )
    return states


# ----------------------------------------------------------------------------------------------------- commands


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no output)"


def slurm_available() -> bool:
    """Whether any Slurm query command is on the PATH."""
    return any(shutil.which(name) for name in ("sacct", "squeue", "scontrol"))


def run_command(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a Slurm command; SlurmError when it is missing or times out (a non-zero exit is the caller's to judge)."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]}: no answer within {timeout:g} s") from None


def sacct_states(job_ids: Sequence[str], timeout: float = SACCT_TIMEOUT_S) -> Dict[str, JobState]:
    """One sacct call for all job_ids; SlurmError where accounting is disabled or unreachable."""
    if not job_ids:
        return {}
    argv = ["sacct", "-D", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(SACCT_FIELDS)]
    result = run_command(argv, timeout)
    check_sacct_output(result.stdout, result.stderr, result.returncode)
    return parse_sacct(result.stdout)


def squeue_states(job_ids: Sequence[str], timeout: float = SQUEUE_TIMEOUT_S) -> Dict[str, JobState]:
    """One squeue call for all job_ids (jobs the controller has forgotten are simply absent)."""
    if not job_ids:
        return {}
    fmt = ",".join(f"{name}:|" for name in SQUEUE_FIELDS)
    # -t all: finished jobs too, while the controller still holds them (MinJobAge, 300 s by default).
    result = run_command(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-O", fmt], timeout)
    if result.returncode != 0:
        # One unknown id alone: "slurm_load_jobs error: Invalid job id specified" -- an answer, not a failure.
        if _INVALID_JOB.search(result.stderr):
            return {}
        raise SlurmError(f"squeue failed (exit {result.returncode}): {_first_line(result.stderr or result.stdout)}")
    return parse_squeue(result.stdout)


def scontrol_job(job_id: str, timeout: float = SCONTROL_TIMEOUT_S) -> Dict[str, str]:
    """``scontrol show job -o ID`` as a dict of its fields ({} when the controller does not know the job)."""
    result = run_command(["scontrol", "show", "job", "-o", job_id], timeout)
    if result.returncode != 0:
        if _INVALID_JOB.search(result.stderr):
            return {}
        raise SlurmError(f"scontrol failed (exit {result.returncode}): {_first_line(result.stderr)}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return parse_scontrol_record(lines[0]) if lines else {}


def scontrol_states(job_ids: Sequence[str], timeout: float = SCONTROL_TIMEOUT_S) -> Dict[str, JobState]:
    """``scontrol show job -o ID`` for each id (at most MAX_SCONTROL_CALLS calls)."""
    states: Dict[str, JobState] = {}
    for job_id in list(job_ids)[:MAX_SCONTROL_CALLS]:
        result = run_command(["scontrol", "show", "job", "-o", job_id], timeout)
        if result.returncode != 0:
            if _INVALID_JOB.search(result.stderr):
                continue
            raise SlurmError(f"scontrol failed (exit {result.returncode}): {_first_line(result.stderr)}")
        found = parse_scontrol(result.stdout)
        state = lookup(found, job_id) or (next(iter(found.values())) if len(found) == 1 else None)
        if state is not None:
            states[job_id] = state
    return states


def query_jobs(job_ids: Iterable[str]) -> Query:
    """The states of job_ids, from sacct, then squeue, then scontrol (see the module docstring). Never raises."""
    ids = sorted({job_id for job_id in job_ids if is_job_id(job_id)}, key=job_sort_key)
    query = Query(slurm_available=slurm_available())
    if not ids or not query.slurm_available:
        return query
    found: Dict[str, JobState] = {}
    try:
        accounted = sacct_states(ids)
        query.sources.append("sacct")
        found = {job_id: state for job_id in ids if (state := lookup(accounted, job_id)) is not None}
    except SlurmError as error:
        query.errors.append(str(error))
    # The controller for what sacct did not know yet, and for whatever may still change (sacct lags behind it).
    ask = [job_id for job_id in ids if job_id not in found or not found[job_id].final]
    live: Dict[str, JobState] = {}
    if ask:
        try:
            queued = squeue_states(ask)
            query.sources.append("squeue")
            live = {job_id: state for job_id in ask if (state := lookup(queued, job_id)) is not None}
        except SlurmError as error:
            query.errors.append(str(error))
            try:
                live = scontrol_states(ask)
                query.sources.append("scontrol")
            except SlurmError as error2:
                query.errors.append(str(error2))
    for job_id, state in live.items():
        before = found.get(job_id)
        restarts = state.restarts
        if before is not None and before.restarts is not None:
            restarts = max(before.restarts, restarts or 0)
        found[job_id] = JobState(
            job_id, state.state, restarts=restarts,
            exit_code=state.exit_code or (before.exit_code if before else None),
            elapsed=state.elapsed or (before.elapsed if before else None), reason=state.reason, source=state.source,
        )
    query.states = found
    return query


def job_states(job_ids: Iterable[str]) -> Dict[str, JobState]:
    """``{job id: JobState}`` for the jobs Slurm knows; the others are absent. Never raises."""
    return query_jobs(job_ids).states


def job_stdout(job_id: str) -> Optional[str]:
    """The StdOut path the controller has for a job (None when unknown or Slurm is unreachable)."""
    try:
        return _none_if_blank(scontrol_job(job_id).get("StdOut", ""))
    except SlurmError:
        return None


def cancel_job(job_id: str, timeout: float = SCANCEL_TIMEOUT_S) -> None:
    """``scancel ID``; SlurmError with scancel's message when it fails."""
    if not is_job_id(job_id):
        raise SlurmError(f"scancel: {job_id!r} is not a job id")
    result = run_command(["scancel", job_id], timeout)
    if result.returncode != 0:
        raise SlurmError(f"scancel {job_id} failed (exit {result.returncode}): {_first_line(result.stderr)}")
