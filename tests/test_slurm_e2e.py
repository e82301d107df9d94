"""End to end through the real local Slurm (scripts/local_slurm.sh up): submission, time limit, preemption, sweeps,
status, and a job run through a stand-in apptainer. Skipped where Slurm is not up.

Each test submits with `python -m launcher +cluster=local_slurm ...` exactly as a user would, waits on Slurm, and reads
the run directory. Time limits are checked by Slurm every 30 s, so the warning signal comes 30-60 s into a 2-minute
job with a 60 s lead: the slow runs below last longer than that on purpose.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from launcher.slurm.query import job_states
from login_helpers import REPO, run_launcher

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
    pytest.skip("the local Slurm is not up (bash scripts/local_slurm.sh up)", allow_module_level=True)

TINY = ["+cluster=local_slurm", "train.eval_every=1000", "train.log_every=1"]
# The uninterrupted reference and the interrupted runs share these (the schedule depends on max_steps).
SLOW_RUN = [*TINY, "train.max_steps=160", "train.save_every=40"]


def submit(args: List[str], cwd: Path, env: Dict[str, str] | None = None) -> List[str]:
    done = run_launcher(args, cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = re.findall(r"submitted job (\d+)", done.stdout)
    assert ids, done.stdout
    return ids


def wait_final(job_id: str, timeout_s: float = 300) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = job_states([job_id]).get(job_id)
        if state is not None and state.final:
            return state.state
        time.sleep(2)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish within {timeout_s} s")


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def losses(run_dir: Path) -> Dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def attempts(run_dir: Path) -> int:
    return sum(" started " in line for line in (run_dir / "logs" / "attempts.log").read_text().splitlines())


def status_json(runs: Path) -> Dict[str, dict]:
    done = subprocess.run([sys.executable, "-m", "launcher.status", str(runs), "--json"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in json.loads(done.stdout)["runs"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm_e2e")


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """An uninterrupted 2-task run, the curve the interrupted ones must reproduce."""
    (job,) = submit([*SLOW_RUN, "run_name=reference"], work)
    assert wait_final(job) == "COMPLETED"
    return work / "runs" / "reference"


def test_two_task_training_job_completes_with_metrics_and_export(reference, work):
    assert sorted(losses(reference)) == list(range(1, 161))
    curve = losses(reference)
    assert curve[160] < curve[1] - 1.0
    export = reference / "export"
    assert (export / "config.json").exists() and list(export.glob("*.safetensors"))
    assert (export / "tokenizer.json").exists() or (export / "tokenizer_config.json").exists()
    config = (reference / "config.yaml").read_text()
    assert "local_slurm" in config and "world" not in config.split("cluster:")[0]
    row = status_json(work / "runs")["reference"]
    assert row["state"] == "COMPLETED" and row["step"] == 160


def test_time_limit_checkpoints_requeues_and_resumes_to_the_same_losses(reference, work):
    # Slurm may signal up to 60 s before the lead: 160 x 0.4 s of steps outlast the first 60 s, so the first
    # attempt is always cut (at least two attempts), and no more sleep than that.
    (job,) = submit([*SLOW_RUN, "run_name=timelimit", "cluster.time=00:02:00", "cluster.signal_lead_s=60",
                     "train.debug_step_sleep_s=0.4"], work)
    run_dir = work / "runs" / "timelimit"
    wait_until(lambda: (run_dir / "metrics.jsonl").exists(), 90, "the first steps")
    assert status_json(work / "runs")["timelimit"]["state"] in ("RUNNING", "PENDING")
    assert wait_final(job, timeout_s=420) == "COMPLETED"
    assert attempts(run_dir) >= 2
    assert losses(run_dir) == losses(reference)  # bit-identical on CPU, one curve across attempts
    log = (run_dir / "logs" / "attempt-1.log").read_text()
    assert "exit 3" in log or "requeue" in log
    assert "resumed from" in (run_dir / "logs" / "attempt-2.log").read_text()
    row = status_json(work / "runs")["timelimit"]
    assert row["state"] == "COMPLETED" and row["attempt"] >= 2


def test_preempted_job_resumes_and_completes_with_the_same_losses(reference, work):
    (job,) = submit([*SLOW_RUN, "run_name=preempted", "train.debug_step_sleep_s=0.25"], work)
    run_dir = work / "runs" / "preempted"
    wait_until(lambda: len(losses(run_dir)) >= 10 if (run_dir / "metrics.jsonl").exists() else False, 120,
               "10 steps before preemption")
    # A higher-priority job that needs the whole node preempts it (PreemptMode=REQUEUE, signal first).
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-n", "4", "--wrap", "sleep 5"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert wait_final(urgent, timeout_s=180) == "COMPLETED"
    assert wait_final(job, timeout_s=300) == "COMPLETED"
    assert attempts(run_dir) >= 2
    assert losses(run_dir) == losses(reference)


def test_two_point_sweep_submits_two_jobs_that_complete(work):
    ids = submit(["-m", *TINY, "run_name=sweep", "train.max_steps=12", "train.lr=1e-3,3e-3"], work)
    assert len(ids) == 2
    assert [wait_final(job) for job in ids] == ["COMPLETED", "COMPLETED"]
    runs = sorted(p.name for p in (work / "runs").glob("sweep__*"))
    assert runs == ["sweep__train.lr=0.001", "sweep__train.lr=0.003"]
    first, second = (losses(work / "runs" / name) for name in runs)
    assert len(first) == len(second) == 12 and first[12] != second[12]


def test_job_runs_through_a_stand_in_apptainer_that_checks_binds_and_environment(work, tmp_path):
    from test_containers import STAND_IN

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "apptainer"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    image = tmp_path / "launcher.sif"
    image.write_text("not really an image")
    record = tmp_path / "record.json"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STANDIN_RECORD": str(record),
           "HF_HOME": str(tmp_path / "hf"), "STANDIN_IMAGE_ENV": json.dumps({"HF_HUB_OFFLINE": "0"})}
    # The local profile has no container, and OmegaConf cannot merge a new section into a null one from the
    # command line: set it in Python, then launch exactly as the command line does.
    script = (
        "import sys\n"
        "from launcher.config.schema import ContainerConfig\n"
        "from launcher.launch import launch\n"
        "from login_helpers import config\n"
        f"cfg = config({[*TINY, 'run_name=container', 'train.max_steps=6']!r})\n"
        f"cfg.cluster.container = ContainerConfig(runtime='apptainer', image={str(image)!r}, gpu_flag=None,\n"
        f"    binds=[], python={sys.executable!r})\n"
        "sys.exit(launch(cfg).code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])})
    assert done.returncode == 0, done.stdout + done.stderr
    (job,) = re.findall(r"submitted job (\d+)", done.stdout)
    assert wait_final(job) == "COMPLETED"
    seen = json.loads(record.read_text())
    assert seen["image"] == str(image)
    assert str(REPO) in seen["binds"] and str(tmp_path / "hf") in seen["binds"]
    for name in ("MASTER_ADDR", "MASTER_PORT", "LAUNCHER_RUN_DIR", "HF_HUB_OFFLINE", "OMP_NUM_THREADS"):
        assert name in seen["forwarded"], name
    assert sorted(losses(work / "runs" / "container")) == list(range(1, 7))
    assert (work / "runs" / "container" / "export" / "config.json").exists()


def test_second_submission_of_a_run_with_a_live_job_is_refused(work):
    (job,) = submit([*TINY, "run_name=busy", "train.max_steps=100", "train.debug_step_sleep_s=1"], work)
    again = run_launcher([*TINY, "run_name=busy", "train.max_steps=100"], cwd=work)
    assert again.returncode == 2
    assert f"job {job} of this run is" in again.stderr and "launcher.status cancel" in again.stderr
    cancel = subprocess.run([sys.executable, "-m", "launcher.status", "cancel", str(work / "runs" / "busy")],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cancel.returncode == 0, cancel.stderr
    assert wait_final(job, timeout_s=120) == "CANCELLED"
