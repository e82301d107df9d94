"""launcher.status and launcher.slurm.query: parsers on recorded Slurm 22.05 output, run directories, the table, logs,
cancel, and (marked slurm) a real job submitted to the local Slurm."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from launcher.rundir import read_metrics_tail
from launcher.slurm import query as sq
from launcher.status.follow import attempt_offset, follow
from launcher.status.runs import STATE_UNKNOWN, collect, job_ids_of, read_attempts, read_run
from launcher.status.table import format_duration, format_rate, format_table, to_json

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ recorded outputs (Slurm 22.05.8)

# sacct -D -X -n -P -o JobID,State,ExitCode,Elapsed -j 3,4,5,9
SACCT_MIXED = """\
3|TIMEOUT|0:0|00:01:14
4|REQUEUED|0:0|00:00:03
4|RUNNING|0:0|00:01:15
5_1|COMPLETED|0:0|00:00:02
5_[0,2]|CANCELLED by 0|0:0|00:00:00
9|PENDING|0:0|00:00:00
"""
# sacct of a job requeued twice, then cancelled (rows not in time order must not matter for the current one)
SACCT_REQUEUED_TWICE = """\
8|REQUEUED|0:0|00:00:03
8|CANCELLED by 0|0:0|00:00:04
8|REQUEUED|0:0|00:00:07
"""
SACCT_DISABLED_STDERR = "Slurm accounting storage is disabled\n"
SACCT_DBD_DOWN_STDERR = (
    "sacct: error: slurm_persist_conn_open_without_init: failed to open persistent connection to "
    "host:127.0.0.1:6819: Connection refused\n"
    """\
sacct: error: Sending PersistInit msg: Connection refused
sacct: error: Problem talking to the database: Connection refused
"""
)
# squeue -h -t all -j ... -O "JobArrayID:|,State:|,RestartCnt:|,TimeUsed:|,Reason:|"
SQUEUE_O = """\
3|RUNNING|0|1:00|None|
4|RUNNING|1|0:46|None|
11_[0-3]|PENDING|0|0:00|JobHeldUser,Resources|
12|COMPLETED|1|0:30|None|
"""
# squeue -h -j 11 -o '%i|%T|%M|%r'
SQUEUE_SHORT = "11_[0-3]|PENDING|0:00|JobHeldUser,Resources\n5|R|1-02:03:04|None\n"
SQUEUE_INVALID_STDERR = "slurm_load_jobs error: Invalid job id specified\n"
SQUEUE_DOWN_STDERR = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"
# scontrol show job -o 4 (abridged, with a Comment holding spaces)
SCONTROL_4 = (
    "JobId=4 JobName=sig.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901756 Nice=0 Account=root "
    "QOS=normal JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 Reboot=0 "
    "ExitCode=0:0 RunTime=00:00:46 TimeLimit=00:30:00 TimeMin=N/A SubmitTime=2026-11-25T09:43:59 "
    "Comment=two words AllocNode:Sid=localhost:2089 NtasksPerN:B:S:C=0:0:*:* Socks/Node=* "
    "StdErr=/tmp/sl/tl-4.out StdIn=/dev/null StdOut=/tmp/sl/tl-4.out Power=\n"
)
SCONTROL_ARRAY = (
    "JobId=11 ArrayJobId=11 ArrayTaskId=2 JobName=wrap JobState=PENDING Reason=JobHeldUser Restarts=0 "
    "ExitCode=0:0 RunTime=00:00:00\n"
)
SCONTROL_ARRAY_RANGE = "JobId=11 ArrayJobId=11 ArrayTaskId=0,2-3 JobState=PENDING Reason=Resources Restarts=0\n"
SCONTROL_MULTILINE = """\
JobId=3 JobName=sig.sh
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   JobState=TIMEOUT Reason=TimeLimit Dependency=(null)
   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0
   RunTime=00:01:14 TimeLimit=00:01:00 TimeMin=N/A

JobId=4 JobName=sig.sh
   JobState=PENDING Reason=BeginTime Dependency=(null)
   Requeue=1 Restarts=1 BatchFlag=1 Reboot=0 ExitCode=0:0
   RunTime=00:00:00 TimeLimit=00:30:00 TimeMin=N/A
"""


# ----------------------------------------------------------------------------------------------------- parsers


def test_parse_sacct_current_row_restarts_and_decorations():
    states = sq.parse_sacct(SACCT_MIXED)
    assert states["3"].state == "TIMEOUT" and states["3"].restarts == 0 and states["3"].final
    assert states["4"].state == "RUNNING" and states["4"].restarts == 1 and states["4"].attempt == 2
    assert states["4"].elapsed_s == 75 and not states["4"].final
    assert states["5_[0,2]"].state == "CANCELLED"
    assert states["9"].source == "sacct"
    twice = sq.parse_sacct(SACCT_REQUEUED_TWICE)["8"]
    assert (twice.state, twice.restarts, twice.attempt) == ("CANCELLED", 2, 3)


def test_parse_sacct_skips_steps_and_blank_lines():
    states = sq.parse_sacct("7|COMPLETED|0:0|00:00:05\n7.batch|COMPLETED|0:0|00:00:05\n\n7.0|FAILED|1:0|00:00:01\n")
    assert list(states) == ["7"] and states["7"].state == "COMPLETED"


@pytest.mark.parametrize(
    "stdout, stderr, rc",
    [("", SACCT_DISABLED_STDERR, 1), ("SLURM accounting storage is disabled\n", "", 0), ("", SACCT_DBD_DOWN_STDERR, 1)],
)
def test_sacct_errors_are_failures(stdout, stderr, rc):
    with pytest.raises(sq.SlurmError) as error:
        sq.check_sacct_output(stdout, stderr, rc)
    assert "sacct" in str(error.value)
    if "disabled" in (stdout + stderr).lower():
        assert "accounting storage is disabled" in str(error.value)
    else:
        assert "Connection refused" in str(error.value)


def test_array_lookup_resolves_pending_ranges():
    states = sq.parse_sacct(SACCT_MIXED)
    assert sq.lookup(states, "5_1").state == "COMPLETED"
    resolved = sq.lookup(states, "5_2")
    assert resolved is not None and resolved.job_id == "5_2" and resolved.state == "CANCELLED"
    assert sq.lookup(states, "5_1") is states["5_1"]
    assert sq.lookup(states, "5_3") is None and sq.lookup(states, "6_0") is None and sq.lookup(states, "6") is None
    assert sq.expand_array_tasks("0-7") == set(range(8))
    assert sq.expand_array_tasks("1,3,5-7") == {1, 3, 5, 6, 7}
    assert sq.expand_array_tasks("0-15:4") == {0, 4, 8, 12}
    assert sq.expand_array_tasks("0-99%10") == set(range(100))


def test_parse_squeue_long_and_short_formats():
    states = sq.parse_squeue(SQUEUE_O)
    assert states["4"].restarts == 1 and states["4"].attempt == 2 and states["4"].elapsed_s == 46
    assert states["3"].reason is None
    pending = sq.lookup(states, "11_2")
    assert pending.state == "PENDING" and pending.reason == "JobHeldUser,Resources" and pending.source == "squeue"
    short = sq.parse_squeue(SQUEUE_SHORT)
    assert short["5"].state == "RUNNING" and short["5"].restarts is None
    assert short["5"].elapsed_s == 93784


def test_parse_scontrol_one_line_multi_line_and_arrays():
    record = sq.parse_scontrol_record(SCONTROL_4.strip())
    assert record["Comment"] == "two words" and record["StdOut"] == "/tmp/sl/tl-4.out" and record["Power"] == ""
    state = sq.parse_scontrol(SCONTROL_4)["4"]
    assert (state.state, state.restarts, state.attempt, state.elapsed_s) == ("RUNNING", 1, 2, 46)
    assert sq.parse_scontrol(SCONTROL_ARRAY)["11_2"].reason == "JobHeldUser"
    assert sq.lookup(sq.parse_scontrol(SCONTROL_ARRAY_RANGE), "11_3").reason == "Resources"
    multi = sq.parse_scontrol(SCONTROL_MULTILINE)
    assert multi["3"].state == "TIMEOUT" and multi["4"].state == "PENDING" and multi["4"].restarts == 1


def test_small_helpers():
    assert sq.normalize_state("CANCELLED by 1000") == "CANCELLED"
    assert sq.normalize_state("COMPLETING+") == "COMPLETING"
    assert sq.normalize_state("PD") == "PENDING" and sq.normalize_state("") == "UNKNOWN"
    assert sq.duration_seconds("00:01:14") == 74 and sq.duration_seconds("1:00") == 60
    assert sq.duration_seconds("2-00:00:01") == 172801 and sq.duration_seconds("INVALID") is None
    assert sq.newest_job(["99", "123_1", "123_10", "123_2", "x"]) == "123_10"
    assert sq.newest_job(["124", "123_10"]) == "124" and sq.newest_job([]) is None


# ------------------------------------------------------------------------------- query_jobs with recorded commands


class FakeSlurm:
    """Stands in for run_command: answers per command name, records every call."""

    def __init__(self, **answers):
        self.answers = answers  # name -> (rc, stdout, stderr) or an exception
        self.calls: List[List[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        answer = self.answers.get(argv[0])
        if answer is None:
            raise sq.SlurmError(f"{argv[0]}: command not found")
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            answer = answer(argv)
        rc, stdout, stderr = answer
        return subprocess.CompletedProcess(list(argv), rc, stdout, stderr)

    def names(self) -> List[str]:
        return [call[0] for call in self.calls]


@pytest.fixture
def fake_slurm(monkeypatch):
    def install(**answers) -> FakeSlurm:
        fake = FakeSlurm(**answers)
        monkeypatch.setattr(sq, "run_command", fake)
        monkeypatch.setattr(sq, "slurm_available", lambda: True)
        return fake

    return install


def test_query_one_sacct_call_for_all_and_no_squeue_when_all_final(fake_slurm):
    fake = fake_slurm(sacct=(0, "3|COMPLETED|0:0|00:00:10\n5_1|FAILED|1:0|00:00:02\n", ""))
    query = sq.query_jobs(["5_1", "3", "3"])
    assert fake.names() == ["sacct"]
    argv = fake.calls[0]
    assert argv[:6] == ["sacct", "-D", "-X", "-n", "-P", "-j"] and argv[6] == "3,5_1"
    assert argv[7:] == ["-o", "JobID,State,ExitCode,Elapsed"]
    assert query.states["3"].state == "COMPLETED" and query.states["5_1"].exit_code == "1:0"
    assert query.errors == [] and query.sources == ["sacct"]


def test_query_asks_the_controller_for_live_and_missing_jobs(fake_slurm):
    # sacct lags: it still says RUNNING for 4 (just cancelled) and does not know 13 yet (just submitted).
    fake = fake_slurm(
        sacct=(0, "3|COMPLETED|0:0|00:00:10\n4|REQUEUED|0:0|00:00:03\n4|RUNNING|0:0|00:01:15\n", ""),
        squeue=(0, "4|CANCELLED|1|1:16|None|\n13|PENDING|0|0:00|Priority|\n", ""),
    )
    states = sq.job_states(["3", "4", "13"])
    squeue = fake.calls[1]
    assert fake.names() == ["sacct", "squeue"] and squeue[squeue.index("-j") + 1] == "4,13"
    assert "-t" in squeue and squeue[squeue.index("-t") + 1] == "all"
    assert states["4"].state == "CANCELLED" and states["4"].attempt == 2 and states["4"].source == "squeue"
    assert states["13"].reason == "Priority" and states["3"].source == "sacct"


def test_query_without_accounting_falls_back_to_squeue(fake_slurm):
    fake = fake_slurm(sacct=(1, "", SACCT_DISABLED_STDERR), squeue=(0, SQUEUE_O, ""))
    query = sq.query_jobs(["3", "4", "11_1", "77"])
    assert fake.names() == ["sacct", "squeue"]
    assert query.states["4"].attempt == 2 and query.states["11_1"].state == "PENDING" and "77" not in query.states
    assert query.errors == ["sacct: Slurm accounting storage is disabled on this cluster"]
    assert query.sources == ["squeue"]


def test_query_falls_back_to_scontrol_when_squeue_fails(fake_slurm):
    answers = {"4": (0, SCONTROL_4, ""), "11_2": (0, SCONTROL_ARRAY, ""), "99": (1, "", SQUEUE_INVALID_STDERR)}
    fake = fake_slurm(
        sacct=(1, "", SACCT_DBD_DOWN_STDERR),
        squeue=(1, "", SQUEUE_DOWN_STDERR),
        scontrol=lambda argv: answers[argv[-1]],
    )
    query = sq.query_jobs(["4", "11_2", "99"])
    assert fake.names() == ["sacct", "squeue", "scontrol", "scontrol", "scontrol"]
    assert query.states["4"].source == "scontrol" and query.states["4"].attempt == 2
    assert query.states["11_2"].state == "PENDING" and "99" not in query.states
    assert len(query.errors) == 2 and "Unable to contact slurm controller" in query.errors[1]


def test_query_single_unknown_id_is_not_an_error(fake_slurm):
    fake = fake_slurm(sacct=(0, "", ""), squeue=(1, "", SQUEUE_INVALID_STDERR))
    query = sq.query_jobs(["42"])
    assert query.states == {} and query.errors == [] and fake.names() == ["sacct", "squeue"]


def test_query_timeouts_and_missing_commands_never_raise(fake_slurm):
    fake = fake_slurm(sacct=sq.SlurmError("sacct: no answer within 15 s"))
    query = sq.query_jobs(["1"])
    assert query.states == {} and fake.names() == ["sacct", "squeue", "scontrol"]
    assert query.errors[0] == "sacct: no answer within 15 s" and "command not found" in query.errors[1]


def test_query_without_slurm(monkeypatch):
    monkeypatch.setattr(sq, "slurm_available", lambda: False)
    monkeypatch.setattr(sq, "run_command", lambda *a, **k: pytest.fail("no command may run"))
    query = sq.query_jobs(["1"])
    assert query.states == {} and not query.slurm_available


def test_run_command_reports_missing_and_slow_commands(tmp_path):
    with pytest.raises(sq.SlurmError, match="command not found"):
        sq.run_command([str(tmp_path / "no-such-sacct")], timeout=5)
    with pytest.raises(sq.SlurmError, match="no answer within"):
        sq.run_command(["sleep", "5"], timeout=0.2)


# -------------------------------------------------------------------------------------------- fake run directories


def make_run(
    root: Path,
    name: str,
    *,
    cluster: Optional[str] = "local_slurm",
    max_steps: Optional[int] = 200,
    jobs: Sequence[str] = (),
    attempts: Sequence[str] = (),
    metrics: Sequence[object] = (),
    export: bool = False,
    checkpoints: Dict[int, bool] = None,
    config: bool = True,
    logs: Dict[str, str] = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    if config:
        cluster_yaml = "cluster: null\n" if cluster is None else f"cluster:\n  name: {cluster}\n  partition: debug\n"
        (run / "config.yaml").write_text(
            f"dry_run: false\nrun_name: {name}\n{cluster_yaml}train:\n  max_steps: {max_steps}\n  lr: 0.003\n"
        )
    if jobs:
        (run / "slurm").mkdir()
        for job in jobs:
            (run / "slurm" / f"{job}_submitted.pkl").write_bytes(b"")
            (run / "slurm" / f"{job}_submission.sh").write_text("#!/bin/bash\n")
    for job, text in (logs or {}).items():
        (run / "slurm").mkdir(exist_ok=True)
        (run / "slurm" / f"{job}_log.out").write_text(text)
    if attempts:
        (run / "logs").mkdir()
        (run / "logs" / "attempts.log").write_text("".join(line + "\n" for line in attempts))
    if metrics:
        lines = [m if isinstance(m, str) else json.dumps(m) for m in metrics]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if export:
        (run / "export").mkdir()
    for step, complete in (checkpoints or {}).items():
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        if complete:
            (run / "checkpoints" / f"step-{step}" / "COMPLETE").write_text("{}")
    return run


def train_record(step: int, loss: float = 2.5, **extra) -> dict:
    record = {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 12345.6, "tokens_per_s_per_device": 6172.8,
              "mfu": 0.41, "peak_mem_gb": 3.2, "elapsed_s": 3723.4}
    record.update(extra)
    return record


ATTEMPTS = [
    "launcher: job 120 attempt 1 started 2026-11-25T09:00:00+00:00 on node1",
    "launcher: job 123 attempt 1 started 2026-11-25T10:00:00+00:00 on node1",
    "launcher: job 123 attempt 1 requeued 2026-11-25T10:30:00+00:00",
    "launcher: job 123 attempt 2 started 2026-11-25T10:31:00+00:00 on node2",
    "launcher: job 123 attempt 2 requeued 2026-11-25T11:01:00+00:00",
    "something else entirely",
]


def test_read_run_from_files_alone(tmp_path):
    run_dir = make_run(
        tmp_path, "tiny-ddp-none", jobs=["120", "123"], attempts=ATTEMPTS,
        metrics=[train_record(149, 2.6), train_record(150, 2.41), {"step": 150, "eval_loss": 2.7, "eval_batches": 4},
                 {"step": 150, "event": "checkpoint", "save_s": 0.2}, '{"step": 151, "loss": 2.'],
        checkpoints={100: True, 150: False},
    )
    run = read_run(run_dir)
    assert (run.name, run.cluster, run.max_steps) == ("tiny-ddp-none", "local_slurm", 200)
    assert run.job_ids == ["120", "123"] and run.job_id == "123"
    assert (run.step, run.loss, run.eval_loss, run.tokens_per_s) == (150, 2.41, 2.7, 12345.6)
    assert run.train_elapsed_s == 3723.4 and run.mfu == 0.41 and run.metrics_age_s is not None
    assert run.last_checkpoint == 100 and not run.export
    # Attempt and requeues of job 123 from logs/attempts.log: started twice, requeued twice.
    assert (run.attempt, run.attempt_source, run.requeues) == (2, "attempts.log", 2)
    assert run.state == STATE_UNKNOWN and run.log == str(run_dir / "slurm" / "123_0_log.out")


def test_read_attempts_and_job_ids(tmp_path):
    attempts = read_attempts(make_run(tmp_path, "r", attempts=ATTEMPTS) / "logs" / "attempts.log")
    assert attempts["123"].attempt == 2 and attempts["123"].requeues == 2 and attempts["123"].last_event == "requeued"
    assert attempts["123"].started == "2026-11-25T10:31:00+00:00 on node2"
    assert attempts["120"].attempt == 1 and attempts["120"].requeues == 0
    # A job known only from attempts.log (no slurm/ folder on this file system) still counts.
    assert job_ids_of(tmp_path / "r", attempts) == ["120", "123"]
    # Array tasks: <arrayid>_submission.sh names the array, the tasks have their own files.
    array = make_run(tmp_path, "arr", jobs=[], logs={"200_1_0": "x", "200_10_0": "y", "200_1_3": "z"})
    (array / "slurm" / "200_submission.sh").write_text("")
    (array / "slurm" / "not-a-job.txt").write_text("")
    assert job_ids_of(array) == ["200_1", "200_10"]


def test_metrics_tail_of_a_large_file(tmp_path):
    lines = [train_record(step, loss=10.0 / step) for step in range(1, 3001)]
    lines += [{"step": 3000, "eval_loss": 1.5, "eval_batches": 4}] * 2000  # push the last train line back
    run = make_run(tmp_path, "big", metrics=lines)
    assert (run / "metrics.jsonl").stat().st_size > 200_000
    tail = read_metrics_tail(run / "metrics.jsonl", block=4096)
    assert tail["train"]["step"] == 3000 and tail["eval_loss"] == 1.5
    assert read_metrics_tail(tmp_path / "absent.jsonl") == {}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"jobs": ["5"], "export": True}, "FINISHED (no slurm)"),
        ({"jobs": ["5"]}, "UNKNOWN"),
        ({"config": False}, "NOT SUBMITTED"),  # a dry run: job.sh only
        ({"cluster": None}, "LOCAL"),
        ({"cluster": None, "export": True}, "FINISHED (local)"),
    ],
)
def test_state_from_the_run_directory(tmp_path, kwargs, expected):
    run_dir = make_run(tmp_path, "r", **kwargs)
    (run_dir / "job.sh").write_text("#!/bin/bash\n")
    assert read_run(run_dir).state == expected


def fixed_query(states: Dict[str, sq.JobState], errors=(), available=True):
    def query(ids):
        return sq.Query(states={k: v for k, v in states.items() if k in ids}, errors=list(errors),
                        slurm_available=available, sources=["squeue"] if errors else ["sacct"])

    return query


def test_collect_applies_slurm_states_and_finds_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "b-run", jobs=["123"], attempts=ATTEMPTS, metrics=[train_record(150)])
    make_run(runs_dir, "a-run", jobs=["7"], export=True, metrics=[train_record(200, 1.9)])
    (runs_dir / "not-a-run").mkdir()
    (runs_dir / "stray.txt").write_text("")
    states = {
        "123": sq.JobState("123", "PENDING", restarts=3, reason="Priority", elapsed="00:00:00", source="squeue"),
        "7": sq.JobState("7", "COMPLETED", restarts=0, exit_code="0:0", elapsed="01:02:03", source="sacct"),
    }
    runs, notes = collect(runs_dir, query=fixed_query(states, errors=["sacct: Slurm accounting storage is "
                                                                       "disabled on this cluster"]))
    assert [run.name for run in runs] == ["a-run", "b-run"]
    a_run, b_run = runs
    assert (a_run.state, a_run.attempt, a_run.slurm_elapsed_s, a_run.export) == ("COMPLETED", 1, 3723, True)
    # Slurm's restart count wins over attempts.log (Slurm also requeues on preemption and node failure).
    assert (b_run.state, b_run.reason, b_run.attempt, b_run.attempt_source) == ("PENDING", "Priority", 4, "slurm")
    assert any("accounting storage is disabled" in note for note in notes)
    # A single run directory is listed alone.
    assert [run.name for run in collect(runs_dir / "b-run", query=fixed_query(states))[0]] == ["b-run"]


def test_collect_without_slurm_derives_states(tmp_path):
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "done", jobs=["1"], export=True)
    make_run(runs_dir, "lost", jobs=["2"], attempts=["launcher: job 2 attempt 3 started x on n"])
    runs, notes = collect(runs_dir, query=fixed_query({}, available=False))
    assert [(run.state, run.attempt) for run in runs] == [("FINISHED (no slurm)", None), ("UNKNOWN", 3)]
    assert "no Slurm commands" in notes[0]


def test_table_and_json(tmp_path):
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "llama-1b-fsdp-lora", jobs=["123"], metrics=[train_record(150, 2.41234)])
    make_run(runs_dir, "tiny", jobs=["99"], export=True, max_steps=10,
             metrics=[train_record(10, 1.5, tokens_per_s=950.0, elapsed_s=90061.0)])
    make_run(runs_dir, "waiting", jobs=["124"])
    states = {
        "123": sq.JobState("123", "RUNNING", restarts=1, elapsed="00:10:00", source="sacct"),
        "99": sq.JobState("99", "COMPLETED", restarts=0, elapsed="00:01:00", source="sacct"),
        "124": sq.JobState("124", "PENDING", restarts=0, reason="Resources", elapsed="0:00", source="squeue"),
    }
    runs, notes = collect(runs_dir, query=fixed_query(states))
    table = format_table(runs)
    lines = table.splitlines()
    assert lines[0].split() == ["RUN", "CLUSTER", "JOB", "STATE", "ATTEMPT", "STEP", "LOSS", "TOK/S", "ELAPSED",
                                "EXPORT"]
    assert lines[1].split() == ["llama-1b-fsdp-lora", "local_slurm", "123", "RUNNING", "2", "150/200", "2.4123",
                                "12.3k", "1:02:03", "-"]
    assert lines[2].split() == ["tiny", "local_slurm", "99", "COMPLETED", "1", "10/10", "1.5000", "950",
                                "1-01:01:01", "yes"]
    assert lines[3].split()[:5] == ["waiting", "local_slurm", "124", "PENDING", "(Resources)"]
    assert lines[3].split()[5:] == ["1", "-/200", "-", "-", "-", "-"]  # ELAPSED: training time only
    # Columns line up: every row's STATE starts where the header's does.
    column = lines[0].index("STATE")
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines)
    data = json.loads(to_json(runs, notes))
    first = data["runs"][0]
    assert first["state"] == "RUNNING" and first["attempt"] == 2 and first["elapsed_s"] == 3723.4
    assert first["slurm_elapsed_s"] == 600 and first["step"] == 150 and data["notes"] == []


def test_formatting_helpers():
    assert format_rate(None) == "-" and format_rate(999) == "999" and format_rate(1_250_000) == "1.2M"
    assert format_duration(0) == "0:00:00" and format_duration(86400 + 61) == "1-00:01:01"


# ------------------------------------------------------------------------------------------------------------ logs

LOG = (
    "launcher: job 123 attempt 1 on node1 (rendezvous node1:10123)\n"
    "train: step 1/10 loss 3.0\n"
    "launcher: checkpoint saved after a stop signal; requeueing job 123 (attempt 1 of at most 6)\n"
    "launcher: job 123 attempt 2 on node2 (rendezvous node2:10123)\n"
    "train: step 6/10 loss 2.0\n"
)


def test_attempt_offset_finds_the_current_attempt(tmp_path):
    path = tmp_path / "123_0_log.out"
    path.write_text(LOG)
    offset = attempt_offset(path)
    assert path.read_bytes()[offset:].startswith(b"launcher: job 123 attempt 2 on node2")
    # Small blocks: the marker may straddle a block boundary or start a block.
    for block in (7, 13, 64, 100):
        assert attempt_offset(path, block=block) == offset
    # A "launcher: job" in the middle of a line is no marker; no marker at all means the whole file.
    path.write_text("x launcher: job 1 attempt 9 on n\nplain\n")
    assert attempt_offset(path) == 0 and attempt_offset(tmp_path / "absent") == 0
    path.write_text("launcher: job 1 attempt 1 on n\n" + "y" * 5000 + "\n")
    assert attempt_offset(path, block=100) == 0


class Collector(io.BytesIO):
    def text(self) -> str:
        return self.getvalue().decode()


def run_follow(locate, until, *, offset=0, timeout=5.0, actions=()):
    """follow() in a thread; actions run one by one once the output shows the text before each; returns output."""
    out, notes = Collector(), []
    done = threading.Event()
    thread = threading.Thread(
        target=follow, args=(locate, out),
        kwargs=dict(offset=offset, poll_s=0.01, rescan_s=0.05, stop=done.is_set, notify=notes.append), daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        for wait_for, action in actions:
            while wait_for not in out.text() and not any(wait_for in note for note in notes):
                assert time.monotonic() < deadline, f"never saw {wait_for!r}: {out.text()!r} {notes}"
                time.sleep(0.01)
            action()
        while until not in out.text():
            assert time.monotonic() < deadline, f"never saw {until!r}: {out.text()!r} {notes}"
            time.sleep(0.01)
    finally:
        done.set()
        thread.join(2)
    return out.text(), notes


def append(path: Path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


def test_follow_across_requeue_truncation_and_replacement(tmp_path):
    path = tmp_path / "123_0_log.out"
    path.write_text(LOG)
    offset = attempt_offset(path)

    def replace():
        other = tmp_path / "new"
        other.write_text("fresh file\n")
        os.replace(other, path)

    text, notes = run_follow(
        lambda: path, "fresh file", offset=offset,
        actions=[
            ("step 6/10", lambda: append(path, "launcher: job 123 attempt 3 on node3\nstep 7\n")),
            ("step 7", lambda: path.write_text("cut\n")),
            ("cut", replace),
        ],
    )
    assert text.startswith("launcher: job 123 attempt 2 on node2") and "attempt 1" not in text
    assert "launcher: job 123 attempt 3 on node3\nstep 7\n" in text and text.endswith("cut\nfresh file\n")
    assert any("truncated" in note for note in notes) and any("replaced" in note for note in notes)


def test_follow_waits_for_the_log_and_switches_to_a_newer_job(tmp_path):
    first, second = tmp_path / "1_0_log.out", tmp_path / "2_0_log.out"
    current = {"path": first}
    text, notes = run_follow(
        lambda: current["path"], "second job",
        actions=[
            ("waiting for", lambda: first.write_text("first job\n")),
            ("first job", lambda: current.update(path=second)),
            ("newer job", lambda: second.write_text("second job\n")),
        ],
    )
    assert text == "first job\nsecond job\n"
    assert any("waiting for" in note for note in notes) and any(str(second) in note for note in notes)


# ----------------------------------------------------------------------------------------------- the command line


def stub_slurm(tmp_path: Path, answers: Dict[str, tuple]) -> Dict[str, str]:
    """A PATH with stub sacct/squeue/scontrol/scancel printing recorded answers and logging their arguments."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    cat = shutil.which("cat") or "/bin/cat"
    for name in ("sacct", "squeue", "scontrol", "scancel"):
        rc, stdout, stderr = answers.get(name, (0, "", ""))
        (bin_dir / f"{name}.out").write_text(stdout)
        (bin_dir / f"{name}.err").write_text(stderr)
        script = bin_dir / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $*" >> "{calls}"\n'
            f'{cat} "{bin_dir}/{name}.out"\n{cat} "{bin_dir}/{name}.err" >&2\nexit {rc}\n'
        )
        script.chmod(0o755)
    return {"PATH": str(bin_dir), "CALLS": str(calls)}


def run_status(args: Sequence[str], env_extra: Dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PATH",)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "launcher.status", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_cli_without_any_slurm_is_fast_and_light(tmp_path):
    runs_dir = tmp_path / "runs"
    for index in range(5):
        make_run(runs_dir, f"run-{index}", jobs=[str(100 + index)], export=index == 0,
                 metrics=[train_record(step) for step in range(1, 200)])
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    code = (
        "import sys, time; t = time.perf_counter(); import launcher.status as s; rc = s.main(sys.argv[1:]); "
        "took = time.perf_counter() - t; heavy = {'torch', 'transformers', 'deepspeed', 'hydra', 'submitit', "
        "'numpy'} & set(sys.modules); print('TOOK', took, 'HEAVY', sorted(heavy), file=sys.stderr); sys.exit(rc)"
    )
    env = dict(os.environ, PATH=str(empty_bin), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # ./runs is the default
    assert lines[1].split()[:4] == ["run-0", "local_slurm", "100", "FINISHED"]
    assert lines[2].split()[3] == "UNKNOWN" and len(lines) == 6
    assert "no Slurm commands" in result.stderr and "HEAVY []" in result.stderr
    took = float(result.stderr.split("TOOK ")[1].split()[0])
    # The light imports are what keeps it fast (HEAVY above); the clock only catches a gross regression, with room for a
    # loaded CI machine (0.1 s when quiet; benchmarks/login_latency.py measures the login path properly).
    assert took < 1.0, f"status took {took:.3f} s"


def test_cli_json_with_stub_slurm(tmp_path):
    runs_dir = tmp_path / "runs"
    make_run(runs_dir, "r", jobs=["4"], metrics=[train_record(3)])
    env = stub_slurm(tmp_path, {"sacct": (1, "", SACCT_DISABLED_STDERR), "squeue": (0, SQUEUE_O, "")})
    result = run_status([str(runs_dir), "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["runs"][0]["state"] == "RUNNING" and data["runs"][0]["attempt"] == 2
    assert data["notes"][0] == "sacct: Slurm accounting storage is disabled on this cluster"
    calls = Path(env["CALLS"]).read_text().splitlines()
    assert calls[0].startswith("sacct -D -X -n -P -j 4 ") and calls[1].startswith("squeue -h -t all -j 4 ")


def test_cli_cancel(tmp_path):
    run_dir = make_run(tmp_path / "runs", "r", jobs=["122", "123"])
    env = stub_slurm(tmp_path, {"sacct": (0, "123|RUNNING|0:0|00:00:05\n", ""),
                                "squeue": (0, "123|RUNNING|0|0:05|None|\n", "")})
    result = run_status(["cancel", str(run_dir)], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "launcher: cancelled job 123 (run r, was RUNNING)"
    assert "scancel 123" in Path(env["CALLS"]).read_text().splitlines()


def test_cli_cancel_of_a_finished_job_cancels_nothing(tmp_path):
    run_dir = make_run(tmp_path / "runs", "r", jobs=["123"])
    env = stub_slurm(tmp_path, {"sacct": (0, "123|COMPLETED|0:0|00:00:05\n", "")})
    result = run_status(["cancel", str(run_dir)], env, tmp_path)
    assert result.returncode == 0 and "already COMPLETED; nothing cancelled" in result.stdout
    assert not any(line.startswith("scancel") for line in Path(env["CALLS"]).read_text().splitlines())


def test_cli_cancel_failure_and_bad_arguments(tmp_path):
    run_dir = make_run(tmp_path / "runs", "r", jobs=["123"])
    env = stub_slurm(tmp_path, {"scancel": (1, "", "scancel: error: Kill job error on job id 123: Access denied\n")})
    result = run_status(["cancel", str(run_dir)], env, tmp_path)
    assert result.returncode == 1 and "Access denied" in result.stderr
    result = run_status(["cancel", str(tmp_path)], env, tmp_path)
    assert result.returncode != 0 and "not a run directory" in result.stderr
    no_job = make_run(tmp_path / "runs", "dry", config=False)
    (no_job / "job.sh").write_text("")
    result = run_status(["cancel", str(no_job)], env, tmp_path)
    assert result.returncode == 1 and "nothing to cancel" in result.stderr


def test_cli_logs(tmp_path):
    run_dir = make_run(tmp_path / "runs", "r", jobs=["120", "123"], logs={"123_0": LOG, "123_1": "rank 1 says hi\n",
                                                                         "120_0": "old job\n"})
    env = stub_slurm(tmp_path, {})
    result = run_status(["logs", str(run_dir)], env, tmp_path)
    assert result.returncode == 0 and result.stdout == LOG[LOG.index("launcher: job 123 attempt 2"):]
    assert run_status(["logs", str(run_dir), "--all"], env, tmp_path).stdout == LOG
    assert run_status(["logs", str(run_dir), "--task", "1"], env, tmp_path).stdout == "rank 1 says hi\n"
    assert run_status(["logs", str(run_dir), "--job", "120"], env, tmp_path).stdout == "old job\n"
    pending = make_run(tmp_path / "runs", "pending", jobs=["130"])
    (tmp_path / "p").mkdir()
    env = stub_slurm(tmp_path / "p", {"squeue": (0, "130|PENDING|0|0:00|Priority|\n", "")})
    result = run_status(["logs", str(pending)], env, tmp_path)
    assert result.returncode == 1 and "no log yet for job 130 (PENDING)" in result.stderr


# --------------------------------------------------------------------------------------------------- real Slurm


def _slurm_usable() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.3)


def _row(run_dir: Path) -> dict:
    result = run_status([str(run_dir), "--json"], {"PATH": os.environ["PATH"]}, run_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["runs"][0]


@pytest.mark.slurm
def test_real_slurm_submit_status_logs_cancel(tmp_path):
    if not _slurm_usable():
        pytest.skip("no usable Slurm here (sbatch missing or sinfo fails); see scripts/local_slurm.sh up")
    run_dir = make_run(tmp_path / "runs", "real-status-run", max_steps=10)
    (run_dir / "slurm").mkdir()
    script = (
        'echo "launcher: job $SLURM_JOB_ID attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on $SLURM_JOB_NODELIST"; '
        "sleep 20"
    )
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--job-name=launcher-status-test", "--cpus-per-task=1", "--time=2",
         "--open-mode=append", f"--output={run_dir}/slurm/%j_0_log.out", f"--chdir={tmp_path}", "--wrap", script],
        capture_output=True, text=True, timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    (run_dir / "slurm" / f"{job_id}_submitted.pkl").write_bytes(b"")  # what submitit leaves before the job starts
    try:
        row = _row(run_dir)
        print(f"submitted job {job_id}: {row['state']} from {row['state_source']}")
        assert row["job_id"] == job_id and row["state"] in ("PENDING", "RUNNING"), row
        assert row["attempt"] == 1 and row["attempt_source"] == "slurm"
        # The node may be busy with other jobs: the log and requeue checks need the job running.
        log = run_dir / "slurm" / f"{job_id}_0_log.out"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (log.exists() and log.stat().st_size):
            time.sleep(0.3)
        if log.exists() and log.stat().st_size:
            result = run_status(["logs", str(run_dir)], {"PATH": os.environ["PATH"]}, tmp_path)
            assert result.stdout.startswith(f"launcher: job {job_id} attempt 1 on "), result
            assert _row(run_dir)["state"] == "RUNNING"
            requeue = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
            assert requeue.returncode == 0, requeue.stderr
            row = _wait(lambda: (r := _row(run_dir))["attempt"] == 2 and r, 10, "attempt 2 after the requeue")
            print(f"after requeue: {row['state']} attempt {row['attempt']} from {row['state_source']}")
            assert row["requeues"] == 1 and row["state"] in ("REQUEUED", "PENDING", "RUNNING", "COMPLETING"), row
        cancelled = run_status(["cancel", str(run_dir)], {"PATH": os.environ["PATH"]}, tmp_path)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.startswith(f"launcher: cancelled job {job_id} (run real-status-run, was ")
        print(cancelled.stdout.strip())
        row = _wait(lambda: (r := _row(run_dir))["state"] == "CANCELLED" and r, 15, "the status to show CANCELLED")
        print(f"then: {row['state']} from {row['state_source']}")
        # sacct catches up a second or two later: its own parse says CANCELLED too (where accounting exists).
        try:
            sq.sacct_states([job_id])
        except sq.SlurmError as error:
            print(f"no sacct check: {error}")
            return
        started = time.monotonic()
        _wait(lambda: (sq.sacct_states([job_id]).get(job_id) or sq.JobState(job_id, "?")).state == "CANCELLED", 15,
              "sacct to record CANCELLED")
        print(f"sacct says CANCELLED after {time.monotonic() - started:.1f} s more")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
