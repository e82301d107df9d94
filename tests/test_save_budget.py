"""The warning when Slurm's signal lead time is shorter than a checkpoint save (estimated, or measured earlier)."""

from __future__ import annotations

import json

from launcher.plan.job import make_plan
from launcher.plan.save_budget import estimated_save_s, save_budget_warning
from login_helpers import LEONARDO_ACCOUNT, config, run_launcher

EIGHT_B = ["+cluster=leonardo", LEONARDO_ACCOUNT, "model=llama-8b", "strategy=zero3"]


def test_estimate_is_16_bytes_per_parameter_over_node_bandwidth():
    cfg = config([*EIGHT_B, "nodes=4"])
    assert estimated_save_s(cfg, make_plan(cfg)) == 16 * 8_030_261_248 / 4e9


def test_short_lead_warns_and_names_the_key(tmp_path):
    cfg = config([*EIGHT_B, "cluster.signal_lead_s=60", f"output_dir={tmp_path}"])
    warning = save_budget_warning(cfg, make_plan(cfg))
    assert "cluster.signal_lead_s=60" in warning and "estimated" in warning
    assert save_budget_warning(config([*EIGHT_B, f"output_dir={tmp_path}"]), make_plan(cfg)) is None  # 600 s


def test_measured_saves_of_earlier_attempts_win(tmp_path):
    cfg = config(["+cluster=local_slurm", "run_name=r", f"output_dir={tmp_path}", "cluster.signal_lead_s=60"])
    plan = make_plan(cfg)
    assert save_budget_warning(cfg, plan) is None  # tiny model: estimated well under a second
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"step": 10, "event": "checkpoint", "save_s": 55.0})
        + "\n")
    warning = save_budget_warning(cfg, plan)
    assert "55s (measured)" in warning


def test_dry_run_prints_the_warning(tmp_path):
    done = run_launcher([*EIGHT_B, "cluster.signal_lead_s=60", "dry_run=true"], cwd=tmp_path)
    assert done.returncode == 0 and "cluster.signal_lead_s=60" in done.stderr
