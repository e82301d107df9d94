"""A prepare job through the real local Slurm, then the training job that waits for it (afterok). Skipped where the
local Slurm is not up (scripts/local_slurm.sh up)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.paths import EXAMPLES_DIR
from login_helpers import run_launcher
from test_slurm_e2e import losses, wait_final

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
    pytest.skip("the local Slurm is not up (bash scripts/local_slurm.sh up)", allow_module_level=True)


def test_gpu_job_waits_for_the_prepare_job_and_reads_its_cache(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((EXAMPLES_DIR / "corpus.txt").read_text() * 3)
    args = ["+cluster=local_slurm", f"data.path={corpus}", "data.prepare_job_above_mb=0", "train.max_steps=6",
            "train.eval_every=1000", "train.log_every=1", "train.seq_len=32", "run_name=after-prepare"]
    done = run_launcher(args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (prepare_id,) = re.findall(r"submitted prepare job (\d+)", done.stdout)
    (train_id,) = re.findall(r"submitted job (\d+)", done.stdout)
    script = (tmp_path / "runs" / "after-prepare" / "job.sh").read_text()
    assert f"--dependency=afterok:{prepare_id}" in script
    assert wait_final(prepare_id) == "COMPLETED"
    assert wait_final(train_id) == "COMPLETED"
    (log,) = (tmp_path / "runs" / ".cache" / "tokenized" / "jobs").glob(f"*/prepare-{prepare_id}.out")
    text = log.read_text()
    assert "prepare: done: 1200 documents" in text and "tokens/s" in text, text[-2000:]
    run = tmp_path / "runs" / "after-prepare"
    assert sorted(losses(run)) == list(range(1, 7))
    job_logs = "".join(p.read_text() for p in (run / "slurm").glob("*.out"))
    assert "tokenized cache reused" in job_logs, job_logs[-3000:]  # the GPU job tokenized nothing
    again = run_launcher([*args, "run_name=second"], cwd=tmp_path)  # the cache now exists: no prepare job
    assert "prepare job" not in again.stdout, again.stdout
    assert wait_final(re.findall(r"submitted job (\d+)", again.stdout)[0]) == "COMPLETED"
