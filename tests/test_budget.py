"""Node-hour budget of a full run, against hand-computed numbers."""

from __future__ import annotations

import pytest

from launcher.plan.budget import estimate_budget
from launcher.plan.flops import flops_for_shape
from launcher.plan.job import make_plan
from launcher.plan.fit import model_shape
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, config, run_launcher


EMBEDDING_8B = 128256 * 4096
MATMUL_8B = 8_030_261_248 - EMBEDDING_8B  # the input embedding is a lookup, not a matmul


def test_flops_per_token_is_6n_plus_attention_as_the_job_counts_it():
    cfg = config(["model=llama-8b"])
    shape = model_shape(cfg.model)
    assert shape.n_params() == 8_030_261_248  # Llama-3.1-8B
    assert flops_for_shape(shape, 4096) == 6 * MATMUL_8B + 12 * 32 * 4096 * 4096
    # LoRA: the adapters take part in the matmuls; weight gradients only for them.
    assert flops_for_shape(shape, 4096, lora_params=1000) == 4 * (MATMUL_8B + 1000) + 2 * 1000 + 12 * 32 * 4096 * 4096


def test_lumi_budget_from_assumed_mfu():
    cfg = config(["+cluster=lumi", LUMI_ACCOUNT, "model=llama-8b", "nodes=16", "train.seq_len=4096",
                  "budget.tokens=2e11"])
    budget = estimate_budget(cfg, make_plan(cfg))
    per_device = 0.35 * 191.5e12 / (6 * MATMUL_8B + 12 * 32 * 4096 * 4096)
    hours = 2e11 / (per_device * 128) / 3600
    assert budget.tokens_per_s_per_device == pytest.approx(per_device)
    assert budget.walltime_h == pytest.approx(hours)
    assert budget.node_hours == pytest.approx(16 * hours)
    assert budget.billing == pytest.approx(4 * 16 * hours, rel=1e-4)  # standard-g: 4 GPU-hours per node-hour


def test_leonardo_budget_from_a_measured_throughput():
    cfg = config(["+cluster=leonardo", LEONARDO_ACCOUNT, "nodes=8", "budget.tokens=1e10",
                  "budget.tokens_per_s_per_device=3000"])
    budget = estimate_budget(cfg, make_plan(cfg))
    hours = 1e10 / (3000 * 32) / 3600
    assert budget.source == "measured" and budget.walltime_h == pytest.approx(hours)
    assert budget.billing == pytest.approx(8 * hours, rel=1e-4) and budget.billing_unit == "node_hours"


def test_no_token_target_no_budget(tmp_path):
    cfg = config(["+cluster=leonardo", LEONARDO_ACCOUNT])
    assert estimate_budget(cfg, make_plan(cfg)) is None
    done = run_launcher(["+cluster=leonardo", LEONARDO_ACCOUNT, "budget.tokens=1e9", "dry_run=true"], cwd=tmp_path)
    assert done.returncode == 0 and "budget: 1e+09 tokens" in done.stdout and "node-hours" in done.stdout
