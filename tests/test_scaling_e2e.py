"""A small scaling sweep on the local Slurm (1 and 2 tasks, CPU, benchmark mode) turned into a report: CSV, markdown
and PNG plots, with a point that failed at run time shown as failed, not dropped."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from login_helpers import REPO
from test_slurm_e2e import submit, wait_final

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_sweep_over_tasks_gives_a_report_with_plots_and_the_failed_point(tmp_path):
    common = ["+cluster=local_slurm", "training=benchmark", "train.max_steps=12", f"output_dir={tmp_path / 'sweep'}"]
    ids = submit(["-m", *common, "run_name=bench", "cluster.tasks_per_node=1,2"], tmp_path)
    # A point that fails inside the job: its model directory passes the login node's check (it holds a config.json)
    # but the config names no model type.
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "config.json").write_text("{}")
    ids += submit([*common, "run_name=bench-broken", f"model.pretrained={tmp_path / 'empty-model'}"], tmp_path)
    states = [wait_final(job) for job in ids]
    assert states[:2] == ["COMPLETED", "COMPLETED"] and states[2] == "FAILED"

    done = subprocess.run([sys.executable, "-m", "launcher.scaling", "report", str(tmp_path / "sweep"),
                           "--warmup-steps", "3", "--tokens", "1e9"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "sweep" / "scaling"
    rows = list(csv.DictReader((out / "scaling.csv").open()))
    by_name = {row["name"]: row for row in rows}
    ok = [by_name["bench__cluster.tasks_per_node=1"], by_name["bench__cluster.tasks_per_node=2"]]
    assert [row["status"] for row in ok] == ["ok", "ok"]
    assert [int(row["devices"]) for row in ok] == [1, 2]
    assert all(float(row["tokens_per_s"]) > 0 for row in ok)
    broken = by_name["bench-broken"]
    assert broken["status"] == "failed" and broken["reason"]
    markdown = (out / "scaling.md").read_text()
    assert "bench-broken" in markdown and "failed" in markdown
    for name in ("throughput.png", "efficiency.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
