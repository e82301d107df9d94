"""The dry run's memory plan (golden tables for an 8B model) and the check that refuses what cannot fit.

Regenerate: UPDATE_GOLDEN=1 python -m pytest tests/test_memory_check.py, then review tests/golden/plan_*.txt.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.plan.job import make_plan
from launcher.plan.fit import check_fits, memory_report, strategy_fits
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, config, run_launcher

GOLDEN = Path(__file__).parent / "golden"
MACHINES = {"lumi": LUMI_ACCOUNT, "leonardo": LEONARDO_ACCOUNT}
EIGHT_B = ["model=llama-8b", "train.seq_len=4096", "train.micro_batch_size=1", "model.gradient_checkpointing=true"]


def tables(machine: str) -> str:
    parts = []
    for nodes in (1, 4, 16):
        cfg = config([f"+cluster={machine}", MACHINES[machine], f"nodes={nodes}", *EIGHT_B])
        parts.append(f"## {machine}, {nodes} nodes\n{memory_report(cfg, make_plan(cfg).world_size)}\n")
    return "\n".join(parts)


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_golden_planning_table(machine):
    path = GOLDEN / f"plan_{machine}_llama-8b.txt"
    text = tables(machine)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"planning table changed (UPDATE_GOLDEN=1 to regenerate):\n{text}"


def test_ddp_8b_does_not_fit_and_is_refused_with_the_table():
    cfg = config(["+cluster=leonardo", LEONARDO_ACCOUNT, *EIGHT_B])
    with pytest.raises(ConfigError) as error:
        check_fits(cfg, make_plan(cfg).world_size)
    message = str(error.value)
    assert error.value.field == "strategy" and "ddp" in message and "ignore_memory_estimate=true" in message
    assert "recommendation: zero2" in error.value.details  # the table, printed after the error line
    check_fits(dataclasses.replace(cfg, ignore_memory_estimate=True), 4)  # the explicit override
    check_fits(config(["+cluster=leonardo", LEONARDO_ACCOUNT, "strategy=zero3", *EIGHT_B]), 4)


def test_submission_that_does_not_fit_stops_before_sbatch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):  # present, but must never be called
        (bin_dir / name).write_text(f"#!/bin/sh\ntouch {tmp_path}/{name}-called\n")
        (bin_dir / name).chmod(0o755)
    done = run_launcher(["+cluster=leonardo", LEONARDO_ACCOUNT, *EIGHT_B], cwd=tmp_path,
                        env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("launcher: error: strategy=ddp: ")
    assert "a strategy whose estimate fits a100_64gb" in done.stderr and "Traceback" not in done.stderr
    assert "recommendation: zero2" in done.stderr and "ignore_memory_estimate=true" in done.stderr
    assert not list(tmp_path.glob("*-called"))


# One Leonardo node, llama-8b at 4096 tokens, no gradient checkpointing: zero3 needs ~63 GiB per A100 on its own,
# ~35 GiB once the optimizer state and gradient shards live on the host.
OFFLOAD_JOB = ["+cluster=leonardo", LEONARDO_ACCOUNT, "model=llama-8b", "train.seq_len=4096",
               "train.micro_batch_size=1", "strategy=zero3"]


def test_zero3_with_offload_on_one_leonardo_node_passes_the_gate():
    cfg = config([*OFFLOAD_JOB, "strategy.offload_optimizer=true"])
    check_fits(cfg, make_plan(cfg).world_size)
    fits, _ = strategy_fits(cfg, make_plan(cfg).world_size)
    zero3 = next(fit for fit in fits if fit.strategy == "zero3")
    assert zero3.fits and zero3.estimate.optimizer == 0 and zero3.estimate.offloaded > 0
    ddp = next(fit for fit in fits if fit.strategy == "ddp")
    assert ddp.estimate.offloaded == 0  # ddp cannot offload: estimated as it would run


def test_the_same_job_without_offload_is_refused():
    cfg = config(OFFLOAD_JOB)
    with pytest.raises(ConfigError, match=r"strategy='zero3' is not allowed.*\(6\d\.\d GiB needed per device\)"):
        check_fits(cfg, make_plan(cfg).world_size)
