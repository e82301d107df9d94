"""Multi-node jobs for real: the local Slurm's partition ``multi`` (``scripts/local_slurm.sh up --nodes 2``) spans two
nodes, ``vnode1`` and ``vnode2``, each a slurmd in its own network and UTS namespace on one machine (shared file
system, gloo over a veth pair). Skipped, with the reason, when that partition is not there or not usable.

What runs across the two hosts: a 2-node x 1-task DDP job against a 1-node x 2-task one (same losses), its preflight
and rendezvous (2 hosts, ``MASTER_ADDR`` the first node), a time-limit requeue of a 2-node job (same losses), a sweep
over ``nodes=1,2`` (a report whose node axis is real), a job kept off a node by ``cluster.exclude_nodes``, and a 2-node
job held by a drained node (pending with the reason, then run after the resume). All jobs but the drain test's are
submitted together (the ``jobs`` fixture) so that their waits overlap; the drain test runs last, when none is left.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from login_helpers import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PARTITION = "multi"


def _multi_not_usable() -> Optional[str]:
    """Why the 2-node tests cannot run here (None when they can)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm commands here (bash scripts/local_slurm.sh up --nodes 2)"
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if done.returncode != 0:
        return f"the local Slurm is not up ({done.stderr.strip()[:200]}; bash scripts/local_slurm.sh up --nodes 2)"
    nodes = dict(line.split()[:2] for line in done.stdout.splitlines() if len(line.split()) >= 2)
    if len(nodes) < 2:
        return (f"the local Slurm has no second node (partition {PARTITION}: {sorted(nodes) or 'absent'}); "
                "bring it up with: bash scripts/local_slurm.sh down; bash scripts/local_slurm.sh up --nodes 2")
    bad = {n: s for n, s in nodes.items() if s not in ("idle", "mixed", "allocated", "completing")}
    if bad:
        return f"nodes of partition {PARTITION} not usable: {bad} (scontrol update NodeName=... State=RESUME)"
    return None


_WHY_NOT = _multi_not_usable()
if _WHY_NOT:
    pytest.skip(_WHY_NOT, allow_module_level=True)

from launcher.slurm.query import job_states  # noqa: E402
from test_slurm_e2e import losses, status_json, submit, wait_final, wait_until  # noqa: E402

# One task per node on two nodes, or two tasks on one node: the same world size, global batch and data order.
TINY = ["+cluster=local_slurm", f"cluster.partition={PARTITION}", "train.eval_every=1000", "train.log_every=1"]
TWO_NODES = ["nodes=2", "cluster.tasks_per_node=1"]
ONE_NODE = ["nodes=1", "cluster.tasks_per_node=2"]
# The uninterrupted 2-node run is also the reference of the time-limit run (the schedule depends on max_steps).
STEPS = 60
RUN = [*TINY, f"train.max_steps={STEPS}", "train.save_every=20"]
# With --time=2 and a 60 s lead the warning comes 30-60 s into the job (Slurm checks every 30 s, and early rather
# than late): 60 steps of at least 1 s after 11+ s of start-up always outlast it, so attempt 1 is always interrupted.
TIME_LIMITED = ["cluster.time=00:02:00", "cluster.signal_lead_s=60", "train.debug_step_sleep_s=1.0"]
SWEEP = [*TINY, "training=benchmark", "cluster.tasks_per_node=1", "train.max_steps=12"]


def hostnames(nodelist: str) -> List[str]:
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True,
                          timeout=30)
    return done.stdout.split()


def node_addr(node: str) -> str:
    done = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, check=True, timeout=30)
    match = re.search(r"NodeAddr=(\S+)", done.stdout)
    assert match, done.stdout
    return match.group(1)


def preflight(run_dir: Path) -> dict:
    return json.loads((run_dir / "preflight.json").read_text())


def nodelist_of(job_id: str) -> str:
    done = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList"], capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode_e2e")


@pytest.fixture(scope="module")
def jobs(work) -> Dict[str, List[str]]:
    """Every job but the drain test's, submitted at once: {name: [job ids]}."""
    submitted = {
        "two-node": submit([*RUN, *TWO_NODES, "run_name=two-node"], work),
        "one-node": submit([*RUN, *ONE_NODE, "run_name=one-node"], work),
        "timelimit": submit([*RUN, *TWO_NODES, *TIME_LIMITED, "run_name=timelimit"], work),
        "sweep": submit(["-m", *SWEEP, f"output_dir={work / 'sweep'}", "run_name=bench", "nodes=1,2"], work),
        "excluded": submit([*TINY, "nodes=1", "cluster.tasks_per_node=1", "cluster.exclude_nodes=vnode1",
                            "train.max_steps=4", "run_name=excluded"], work),
    }
    assert len(submitted["sweep"]) == 2, submitted
    yield submitted
    states = job_states([j for ids in submitted.values() for j in ids])
    live = [j for j, state in states.items() if not state.final]
    if live:
        subprocess.run(["scancel", *live], capture_output=True)


@pytest.fixture(scope="module")
def finished(jobs, work) -> Dict[str, Path]:
    """The two references, completed."""
    runs = {}
    for name in ("two-node", "one-node"):
        (job,) = jobs[name]
        assert wait_final(job, timeout_s=420) == "COMPLETED", f"{name}: see {work / 'runs' / name / 'logs'}"
        runs[name] = work / "runs" / name
    return runs


def test_two_nodes_one_task_each_match_one_node_two_tasks(finished):
    two, one = losses(finished["two-node"]), losses(finished["one-node"])
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-6, abs=0), step
    assert two[STEPS] < two[1] - 1.0  # it trained


def test_two_node_job_has_a_rank_on_each_host_and_rendezvous_on_the_first(finished, jobs):
    run_dir = finished["two-node"]
    report = preflight(run_dir)
    assert report["ok"] and report["world_size"] == 2
    assert len(report["hosts"]) == 2, report["hosts"]
    by_rank = {r["rank"]: r for r in report["records"]}
    assert sorted(by_rank) == [0, 1]
    assert by_rank[0]["host"] != by_rank[1]["host"]
    assert {r["local_rank"] for r in by_rank.values()} == {0}
    assert [by_rank[r]["env"]["SLURM_NODEID"] for r in (0, 1)] == ["0", "1"]

    (job,) = jobs["two-node"]
    nodes = hostnames(nodelist_of(job))
    assert nodes == sorted(report["hosts"]) and by_rank[0]["host"] == nodes[0]
    # MASTER_ADDR is the allocation's first node, and its name resolves to that node's address (here and in the job).
    assert {r["env"]["MASTER_ADDR"] for r in by_rank.values()} == {nodes[0]}
    assert socket.gethostbyname(nodes[0]) == node_addr(nodes[0])
    slurm_log = next((run_dir / "slurm").glob(f"{job}_0_log.out")).read_text()
    assert f"(rendezvous {nodes[0]}:" in slurm_log

    # Rank 0's per-attempt log: the preflight table shows rank 0 on the first host and rank 1 on the second.
    log = (run_dir / "logs" / "attempt-1.log").read_text()
    assert "2 rank(s) on 2 host(s)" in log
    table = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s+([01])\s+0\s+(\S+)\s+cpu\b", log, re.M)}
    assert table == {0: nodes[0], 1: nodes[1]}, log[:2000]

    single = preflight(finished["one-node"])
    assert len(single["hosts"]) == 1 and single["world_size"] == 2
    assert sorted(r["local_rank"] for r in single["records"]) == [0, 1]


def test_time_limit_requeue_of_a_two_node_job_resumes_to_the_same_losses(finished, jobs, work):
    (job,) = jobs["timelimit"]
    run_dir = work / "runs" / "timelimit"
    assert wait_final(job, timeout_s=480) == "COMPLETED"
    text = (run_dir / "logs" / "attempts.log").read_text()
    assert sum(" started " in line for line in text.splitlines()) >= 2, text
    assert losses(run_dir) == losses(finished["two-node"])  # bit-identical across the attempts
    log = (run_dir / "logs" / "attempt-1.log").read_text()
    assert "exit 3" in log or "requeue" in log
    assert "resumed from" in (run_dir / "logs" / "attempt-2.log").read_text()
    assert len(preflight(run_dir)["hosts"]) == 2  # the last attempt ran on both nodes too
    row = status_json(work / "runs")["timelimit"]
    assert row["state"] == "COMPLETED" and row["attempt"] >= 2


def test_sweep_over_nodes_gives_a_report_with_a_real_node_axis(jobs, work):
    assert [wait_final(job, timeout_s=300) for job in jobs["sweep"]] == ["COMPLETED", "COMPLETED"]
    sweep = work / "sweep"
    done = subprocess.run([sys.executable, "-m", "launcher.scaling", "report", str(sweep), "--warmup-steps", "3",
                           "--tokens", "1e9"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["name"]: row for row in csv.DictReader((sweep / "scaling" / "scaling.csv").open())}
    one, two = rows["bench__nodes=1"], rows["bench__nodes=2"]
    assert [one["status"], two["status"]] == ["ok", "ok"]
    assert [int(one["nodes"]), int(two["nodes"])] == [1, 2]
    assert [int(one["devices"]), int(two["devices"])] == [1, 2]
    assert float(one["tokens_per_s"]) > 0 and float(two["tokens_per_s"]) > 0
    # Real: the 2-node point ran on two hosts, the 1-node point on one.
    assert len(hostnames(one["nodelist"])) == 1 and len(hostnames(two["nodelist"])) == 2
    assert len(preflight(sweep / "bench__nodes=2")["hosts"]) == 2
    assert "bench__nodes=2" in (sweep / "scaling" / "scaling.md").read_text()


def test_excluded_node_gets_no_rank(jobs, work):
    (job,) = jobs["excluded"]
    assert wait_final(job, timeout_s=300) == "COMPLETED"
    assert nodelist_of(job) == "vnode2"
    assert preflight(work / "runs" / "excluded")["hosts"] == ["vnode2"]


def test_drained_node_holds_a_two_node_job_pending_with_the_reason_until_resumed(jobs, work):
    # Last: nothing else of this module may need both nodes while one is drained.
    for job in [j for ids in jobs.values() for j in ids]:
        wait_final(job, timeout_s=480)
    second = sorted(subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N"], capture_output=True,
                                   text=True, check=True).stdout.split())[-1]
    reason = "multinode e2e drain test"
    subprocess.run(["scontrol", "update", f"NodeName={second}", "State=DRAIN", f"Reason={reason}"], check=True)
    job = None
    try:
        wait_until(lambda: "drain" in subprocess.run(["sinfo", "-h", "-n", second, "-o", "%T"], capture_output=True,
                                                     text=True).stdout, 30, f"{second} drained")
        (job,) = submit([*TINY, *TWO_NODES, "train.max_steps=4", "run_name=drained"], work)
        time.sleep(6)  # several scheduler passes (sched_interval=2, bf_interval=1)
        assert job_states([job])[job].state == "PENDING"
        row = status_json(work / "runs")["drained"]
        assert row["state"] == "PENDING" and row.get("reason"), row
        # Slurm 22.05 says "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority
        # partitions" (squeue's short form: ReqNodeNotAvail).
        assert re.search(r"DRAIN|ReqNodeNotAvail|UnavailableNodes", row["reason"]), row
        table = subprocess.run([sys.executable, "-m", "launcher.status", str(work / "runs")], capture_output=True,
                               text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert f"PENDING ({row['reason']})" in table.stdout, table.stdout
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={second}", "State=RESUME"], check=True)
    assert wait_final(job, timeout_s=180) == "COMPLETED"
    assert sorted(losses(work / "runs" / "drained")) == [1, 2, 3, 4]
    assert len(preflight(work / "runs" / "drained")["hosts"]) == 2
