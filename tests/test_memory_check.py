"""The dry run's memory plan (golden tables for 8B and 70B models), host memory per node, and the check that refuses
what cannot fit.

Regenerate: UPDATE_GOLDEN=1 python -m pytest tests/test_memory_check.py, then review tests/golden/plan_*.txt.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.plan import estimate_memory
from launcher.plan.devices import GIB
from launcher.plan.fit import check_fits, host_budget_bytes, memory_report, model_shape, strategy_fits
from launcher.plan.host import (
    DS_SUB_GROUP_SIZE, JOB_LOW_MEMORY_LOAD, RANK_ALLOWANCE_BYTES, deepspeed_pinned_bytes, load_bytes, load_rule,
    plan_host,
)
from launcher.plan.job import make_plan
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


# --- host memory per node -----------------------------------------------------------------------------------------

SEVENTY_B = ["model=llama-70b", "train.seq_len=4096", "train.micro_batch_size=1", "model.gradient_checkpointing=true"]
N_8B, N_70B = 8_030_261_248, 70_553_706_496  # Llama-3.1-8B and -70B (conf/model/llama-{8b,70b}.yaml)


def test_llama_70b_preset_has_the_published_shape():
    cfg = config(["model=llama-70b"])
    assert model_shape(cfg.model).n_params() == N_70B
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.intermediate_size) == (80, 8192, 28672)
    assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.vocab_size) == (64, 8, 128256)
    assert (cfg.model.rope_theta, cfg.model.max_position_embeddings) == (500000.0, 131072)
    assert cfg.model.tie_embeddings is False and cfg.model.pretrained is None


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "fsdp"])
def test_load_before_issue_15_was_one_fp32_copy_per_rank(strategy):
    assert JOB_LOW_MEMORY_LOAD  # the job builds low-memory (tests/test_low_memory.py checks what each rank holds)
    rule = load_rule(strategy, low_memory_load=False)
    assert (rule.copies, rule.dtype) == ("rank", "fp32")
    assert load_bytes(rule, N_8B, 8, "bf16") == 8 * 4 * N_8B  # LUMI: 8 x 32.1 GB = 257 GB (239.3 GiB)
    assert load_bytes(rule, N_70B, 4, "bf16") == 4 * 4 * N_70B  # Leonardo: 4 x 282 GB


@pytest.mark.parametrize("strategy, per_node", [("ddp", 0), ("zero1", 0), ("zero2", 0), ("zero3", 2), ("fsdp", 2)])
def test_low_memory_load_table(strategy, per_node):
    # Replicated strategies load straight to the device; sharded ones hold one copy per node in the training dtype.
    rule = load_rule(strategy, low_memory_load=True)
    assert load_bytes(rule, N_70B, 8, "bf16") == per_node * N_70B
    assert load_bytes(rule, N_70B, 8, "fp32") == 2 * per_node * N_70B  # CPU runs train in fp32


def test_host_plan_against_hand_arithmetic():
    # 70B, zero3 with optimizer offload on 4 LUMI nodes (32 ranks, 8 per node), bf16.
    estimate = estimate_memory(N_70B, "zero3", 32, offload_optimizer=True)
    shard = -(-N_70B // 32)
    assert estimate.offloaded == -(-12 * N_70B // 32) + -(-4 * N_70B // 32)  # Adam + fp32 master, fp32 grad shard
    plan = plan_host("zero3", n_params=N_70B, offloaded=estimate.offloaded, device_total=estimate.total,
                     ranks_per_node=8, world_size=32, budget_bytes=480 * GIB, precision="bf16",
                     offload_optimizer=True, trainable=N_70B, largest_layer=128256 * 8192)
    pinned = 4 * min(DS_SUB_GROUP_SIZE, shard)  # one ZeRO-3 sub-group's fp32 gradient buffer
    assert plan.steady == 8 * (estimate.offloaded + pinned)
    assert plan.load == 2 * N_70B and plan.allowance == 8 * 2 * GIB == 8 * RANK_ALLOWANCE_BYTES  # one bf16 copy
    assert plan.peak == max(plan.load, plan.steady) + plan.allowance
    assert plan.load_fits and plan.fits
    assert plan.steady_fits  # 8 x 35.3 GB + 8 x 4 GB = 314 GB of offloaded state fits 480 GiB
    # ZeRO-1/2: a 16-bit copy of the partition and one largest-parameter gradient buffer.
    assert deepspeed_pinned_bytes(2, N_8B, 8, 128256 * 4096) == 2 * -(-N_8B // 8) + 2 * 128256 * 4096
    assert deepspeed_pinned_bytes(0, N_8B, 8, 1) == 0


def test_host_plan_on_a_cpu_device_counts_every_state():
    estimate = estimate_memory(10**9, "ddp", 2, precision="fp32")
    plan = plan_host("ddp", n_params=10**9, offloaded=0, device_total=estimate.total, ranks_per_node=2,
                     world_size=2, budget_bytes=16 * GIB, precision="fp32", on_cpu=True)
    assert plan.steady == 2 * estimate.total and plan.load == 0  # ddp loads straight onto its (CPU) device
    assert plan.peak == 2 * estimate.total + 2 * RANK_ALLOWANCE_BYTES


@pytest.mark.parametrize("overrides, gib", [
    (["+cluster=lumi", LUMI_ACCOUNT], 480),  # 8 x mem_per_gpu 60G, host_mem_gb 480
    (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "cluster.gpus_per_node_requested=1"], 60),
    (["+cluster=leonardo", LEONARDO_ACCOUNT], 480),  # mem 480G capped by host_mem_gb 494
    (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.gpus_per_node_requested=2"], 240),  # 2 x 120G
    (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.mem=1T"], 494),  # a request above the node: the node
    (["+cluster=local_slurm"], 16),
])
def test_host_budget_is_the_request_capped_by_the_node(overrides, gib):
    assert host_budget_bytes(config(overrides).cluster) == gib * GIB


def test_no_host_memory_known_means_no_host_column():
    cfg = config(["+cluster=local_slurm", "cluster.host_mem_gb=null"])
    assert host_budget_bytes(cfg.cluster) is None
    assert "host GiB/node" not in memory_report(cfg, 2)
    with pytest.raises(ConfigError, match="cluster.host_mem_gb"):
        host_budget_bytes(config(["+cluster=local_slurm", "cluster.host_mem_gb=0"]).cluster)


def test_gate_refuses_70b_lora_on_one_gcd_share_for_host_memory_at_load():
    # small-g, 1 GCD: 60 GiB of host memory, but rank 0 reads one bf16 copy of the 70B base (131.5 GiB).
    cfg = config(["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "cluster.gpus_per_node_requested=1",
                  "strategy=zero3", "peft=lora", *SEVENTY_B])
    with pytest.raises(ConfigError) as error:
        check_fits(cfg, make_plan(cfg).world_size)
    message = str(error.value)
    assert "host memory at load: zero.Init: rank 0 reads one copy" in message
    assert "more than the job's 60.0 GiB" in message and "ignore_memory_estimate=true" in message
    assert "host load" in error.value.details and "host GiB/node" in error.value.details
    check_fits(dataclasses.replace(cfg, ignore_memory_estimate=True), 1)


@pytest.mark.parametrize("machine, nodes, peft", [("lumi", 4, []), ("leonardo", 8, []), ("lumi", 1, ["peft=lora"]),
                                                  ("leonardo", 1, ["peft=lora"])])
def test_70b_that_fits_the_device_passes_the_gate_with_low_memory_loading(machine, nodes, peft):
    cfg = config([f"+cluster={machine}", MACHINES[machine], f"nodes={nodes}", "strategy=zero3", *SEVENTY_B, *peft])
    check_fits(cfg, make_plan(cfg).world_size)  # one bf16 copy on rank 0's node: 147.4 / 139.4 GiB of 480
    assert "recommendation: zero3" in memory_report(cfg, make_plan(cfg).world_size)


def test_offload_that_does_not_fit_the_host_is_refused():
    # 8B zero3 on one GCD of small-g: 60 GiB of host, but 16 B/param offloaded = 120 GiB.
    cfg = config(["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "cluster.gpus_per_node_requested=1",
                  "strategy=zero3", "strategy.offload_optimizer=true", "strategy.offload_params=true", *EIGHT_B])
    with pytest.raises(ConfigError) as error:
        check_fits(cfg, make_plan(cfg).world_size)
    message = str(error.value)
    assert error.value.field == "strategy" and "host memory during training" in message
    assert "use more nodes" in message and "offload less" in message and "host load" not in message
    assert "no: host offload" in error.value.details


def test_dry_run_shows_host_memory_per_node(tmp_path):
    done = run_launcher(["+cluster=leonardo", LEONARDO_ACCOUNT, "nodes=8", "dry_run=true", "run_name=h",
                         f"output_dir={tmp_path}", *SEVENTY_B], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "memory per device and host memory per node (llama-70b, 8 nodes)" in done.stdout
    assert "| host GiB/node | fits" in done.stdout and "1 x 131.42 GiB = 131.42 GiB" in done.stdout


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_golden_70b_planning_table(machine):
    path = GOLDEN / f"plan_{machine}_llama-70b.txt"
    parts = []
    for nodes, peft in (({"lumi": 4, "leonardo": 8}[machine], []), (1, ["peft=lora"])):
        cfg = config([f"+cluster={machine}", MACHINES[machine], f"nodes={nodes}", *SEVENTY_B, *peft])
        label = "lora" if peft else "full fine-tuning"
        parts.append(f"## {machine}, {nodes} nodes, {label}\n{memory_report(cfg, make_plan(cfg).world_size)}\n")
    text = "\n".join(parts)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"planning table changed (UPDATE_GOLDEN=1 to regenerate):\n{text}"


def test_cpu_ranks_are_checked_against_the_nodes_memory():
    # local_slurm: 2 CPU ranks with 16 GiB; a 1B model in fp32 needs 2 x ~19 GiB of training states.
    cfg = config(["+cluster=local_slurm", "model=llama-1b", "train.seq_len=256", "train.micro_batch_size=1"])
    with pytest.raises(ConfigError) as error:
        check_fits(cfg, make_plan(cfg).world_size)
    assert error.value.field == "strategy" and "training states of the CPU ranks" in str(error.value)
    assert "| no: host training" in error.value.details
    check_fits(config(["+cluster=local_slurm"]), 2)  # the tiny default model fits
