"""Rank 0 working alone (tokenizing) for longer than the collective timeout must not kill the others: they wait for
its flag file first, then meet it in a short collective."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import sys, time
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist
from launcher.train import distributed as D

use_flag = sys.argv[1] == "flag"
dist.init_process_group("gloo", timeout=timedelta(seconds=3))
rank = dist.get_rank()

def work(barrier):
    if rank == 0:
        time.sleep(8)  # longer than the 3 s collective timeout
    barrier()
    return "ok"

try:
    result = D.run_together(work, torch.device("cpu"), "testing", flag_dir=Path(sys.argv[2]) if use_flag else None)
    print(f"rank {rank}: {result}", flush=True)
    code = 0
except Exception as error:
    print(f"rank {rank}: failed: {type(error).__name__}", flush=True)
    code = 1
sys.stdout.flush()
import os; os._exit(code)
"""


def torchrun(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "sync.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), mode, str(tmp_path / "sync")], capture_output=True, text=True, env=env,
                          timeout=120)


def test_waiting_ranks_outlast_the_collective_timeout_with_the_flag_file(tmp_path):
    done = torchrun(tmp_path, "flag")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0: ok" in done.stdout and "rank 1: ok" in done.stdout
    assert not list((tmp_path / "sync").glob(".ready-*"))  # cleaned up


def test_without_the_flag_file_the_collective_times_out(tmp_path):
    done = torchrun(tmp_path, "none")
    assert done.returncode != 0 and "failed" in done.stdout
