"""A hang that names a node, through the real two-node local Slurm (partition ``multi``: vnode1, vnode2).

The batch script (``slurm_templates/common_teardown.sh``) sees the hang's exit code and the node file, resubmits the
job with that node excluded (Slurm refuses ``ExcNodeList`` on a running job), and the new job resumes from the
checkpoint on the other node; with ``cluster.max_node_exclusions`` reached it stops with the reason. Both scenarios
and the uninterrupted reference are submitted together so that their waits overlap.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from test_multinode_e2e import PARTITION, nodelist_of  # noqa: F401 (skips this module where `multi` is not usable)
from test_slurm_e2e import losses, status_json, submit, wait_final, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ONE_TASK = ["+cluster=local_slurm", f"cluster.partition={PARTITION}", "nodes=1", "cluster.tasks_per_node=1",
            "train.max_steps=12", "train.save_every=4", "train.log_every=1", "train.eval_every=1000",
            "train.export=false", "train.preflight=false"]
# The only rank sleeps at step 6 (after the step-4 checkpoint); the watchdog fires 15 s later with exit 5.
HANG = ["train.hang_timeout_s=15", "train.debug_hang_at_step=6", "train.debug_hang_in=sleep"]


def attempts_log(run_dir: Path) -> str:
    return (run_dir / "logs" / "attempts.log").read_text()


def resubmitted_job(run_dir: Path) -> str:
    match = re.search(r"resubmitted as job (\d+)", attempts_log(run_dir))
    assert match, attempts_log(run_dir)
    return match.group(1)


def exit_code(job_id: str) -> str:
    done = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "ExitCode"], capture_output=True,
                          text=True, timeout=30)
    return done.stdout.strip().splitlines()[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("node_exclusion_e2e")


@pytest.fixture(scope="module")
def jobs(work) -> Dict[str, List[str]]:
    submitted = {
        "reference": submit([*ONE_TASK, "run_name=reference"], work),
        "bad-node": submit([*ONE_TASK, *HANG, "train.debug_hang_attempts=1", "run_name=bad-node"], work),
        "capped": submit([*ONE_TASK, *HANG, "cluster.max_node_exclusions=1", "run_name=capped"], work),
    }
    yield submitted
    subprocess.run(["scancel", "--name=bad-node,capped"], capture_output=True)


def test_hung_job_is_resubmitted_without_its_node_and_completes_with_the_same_losses(jobs, work):
    run = work / "runs" / "bad-node"
    (first,) = jobs["bad-node"]
    assert wait_final(first, timeout_s=300) == "FAILED"
    assert exit_code(first) == "5:0"  # rundir.EXIT_HANG, through srun and the batch script
    bad = nodelist_of(first)
    second = resubmitted_job(run)
    shown = subprocess.run(["scontrol", "show", "job", second], capture_output=True, text=True, timeout=30).stdout
    assert re.search(rf"ExcNodeList=\S*{bad}", shown), shown
    assert wait_final(second, timeout_s=300) == "COMPLETED", attempts_log(run)
    assert nodelist_of(second) not in ("", bad)
    assert (run / "logs" / "excluded_nodes").read_text().split()[0] == bad
    assert (run / "hangs" / "attempt-1" / "rank-0.txt").is_file()
    (reference,) = jobs["reference"]
    assert wait_final(reference, timeout_s=300) == "COMPLETED"
    expected = losses(work / "runs" / "reference")
    assert sorted(expected) == list(range(1, 13))
    assert losses(run) == expected  # resumed from step 4 on the other node: bit-identical
    row = status_json(work / "runs")["bad-node"]  # status follows the run to its new job
    assert row["job_id"] == second and row["state"] == "COMPLETED", row


def test_exclusion_cap_stops_with_the_reason(jobs, work):
    run = work / "runs" / "capped"
    (first,) = jobs["capped"]
    assert wait_final(first, timeout_s=300) == "FAILED"
    second = resubmitted_job(run)
    assert wait_final(second, timeout_s=300) == "FAILED"
    assert exit_code(second) == "5:0"
    wait_until(lambda: "cap (cluster.max_node_exclusions=1) is reached" in attempts_log(run), 30, "the final line")
    assert attempts_log(run).count("resubmitted as job") == 1  # no third job
    assert len((run / "logs" / "excluded_nodes").read_text().splitlines()) == 1
