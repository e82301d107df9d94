"""The GPU-path fixes (issue 11), tested without a GPU: what DeepSpeed and torch would read and choose on LUMI and
Leonardo, the planner's DDP term, the throughput clock, the version floor, and FSDP's gradient memory under
accumulation measured on 2 CPU ranks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

from launcher.plan.memory import estimate_memory  # noqa: E402
from launcher.train import distributed as D  # noqa: E402
from launcher.train.topology import prepare_environment  # noqa: E402
from launcher.train.metrics import StepWindow  # noqa: E402
from login_helpers import LEONARDO_ACCOUNT, REPO, config  # noqa: E402

LUMI = "ROCR_VISIBLE_DEVICES"  # the LUMI profile's cluster.visible_devices_var
SLURM_TASK = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
              "MASTER_ADDR": "nid005001", "MASTER_PORT": "12345", "SLURM_JOB_ID": "4242"}


def test_deepspeed_sees_local_rank_0_when_lumi_leaves_one_gcd_per_process() -> None:
    environ = dict(SLURM_TASK)
    topo, single = prepare_environment(LUMI, environ)
    assert single and topo.local_rank == 5
    # DeepSpeed's engine and zero.Init call set_device(int(LOCAL_RANK)): with one visible GCD only 0 exists.
    assert environ["LOCAL_RANK"] == "0"
    assert environ["ROCR_VISIBLE_DEVICES"] == "5"
    assert environ["LAUNCHER_LOCAL_RANK"] == "5" and environ["RANK"] == "13" and environ["LOCAL_WORLD_SIZE"] == "8"


def test_local_rank_stays_the_node_rank_when_the_process_sees_every_gpu() -> None:
    environ = dict(SLURM_TASK, CUDA_VISIBLE_DEVICES="0,1,2,3")  # Leonardo: Slurm's --gpus-per-node binding
    topo, single = prepare_environment(None, environ)
    assert not single and environ["LOCAL_RANK"] == "5" == str(topo.local_rank)


def test_fsdp_offload_on_gpus_gets_gloo_for_cpu_tensors() -> None:
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from launcher.train.strategies.fsdp import needs_cpu_collectives

    offload = SimpleNamespace(name="fsdp", offload_params=False, offload_optimizer=True)
    assert needs_cpu_collectives(offload, "cuda")
    assert not needs_cpu_collectives(offload, "cpu")
    assert not needs_cpu_collectives(SimpleNamespace(name="fsdp", offload_params=False, offload_optimizer=False),
                                     "cuda")
    assert not needs_cpu_collectives(SimpleNamespace(name="zero3", offload_params=True, offload_optimizer=True),
                                     "cuda")
    backend = D.process_group_backend("nccl", "cuda", cpu_collectives=True)
    assert backend == "cuda:nccl,cpu:gloo"
    assert BackendConfig(Backend(backend)).get_device_backend_map() == {"cuda": "nccl", "cpu": "gloo"}
    assert D.process_group_backend("nccl", "cuda", cpu_collectives=False) == "nccl"
    assert D.process_group_backend("gloo", "cpu", cpu_collectives=True) == "gloo"


def test_ddp_plan_counts_fp32_weights_their_autocast_copies_grads_and_adam() -> None:
    n = 1_000_000_000
    plan = estimate_memory(n, "ddp", 8, precision="bf16")
    # fp32 weights 4 + bf16 autocast copies 2, fp32 grads (bucket views, no second copy) 4, Adam moments 8: 18 B/param.
    assert (plan.parameters, plan.gradients, plan.optimizer) == (6 * n, 4 * n, 8 * n)
    assert plan.total == 18 * n
    lora = estimate_memory(n, "ddp", 8, precision="bf16", lora_params=1000)
    assert (lora.parameters, lora.gradients, lora.optimizer) == (6 * (n + 1000), 4000, 8000)
    fp32 = estimate_memory(n, "ddp", 8, precision="fp32")
    assert fp32.total == 16 * n  # no autocast copies in fp32


def test_fsdp_plan_holds_sharded_gradients_whatever_the_accumulation() -> None:
    n = 1_000_000_000
    plan = estimate_memory(n, "fsdp", 8, precision="bf16")
    assert plan.gradients == 2 * n // 8 and plan.parameters == 2 * n // 8 and plan.optimizer == 12 * n // 8


def test_throughput_window_reads_the_clock_after_the_devices_queued_work() -> None:
    now = [100.0]
    window = StepWindow(clock=lambda: now[0])
    window.steps = 4
    now[0] += 1.0  # the host queued 4 steps in 1 s ...

    def sync() -> str:
        now[0] += 7.0  # ... and the device needs 7 s more to finish them
        return "values"

    values, steps, seconds = window.close(sync)
    assert (values, steps, seconds) == ("values", 4, 8.0)
    window.excluded_s = 0.5
    now[0] += 2.0
    assert window.close(lambda: None)[2] == pytest.approx(1.5)  # the next window starts after the sync


def test_leonardo_profile_leaves_cuda_device_max_connections_unset() -> None:
    cfg = config(["+cluster=leonardo", LEONARDO_ACCOUNT])
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in cfg.cluster.env
    assert cfg.cluster.env["NCCL_IB_TIMEOUT"] == "23"


def test_deepspeed_floor_is_one_number_in_pyproject_and_in_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.train.strategies import deepspeed as ds
    from launcher.train.strategies.base import StrategyUnavailable

    pyproject = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'"deepspeed>=([0-9.]+)', pyproject).group(1)
    assert ds.parse_version(floor) == ds.MIN_VERSION == (0, 19, 3)
    assert ds.parse_version("0.19.8+cuda124") == (0, 19, 8) and ds.parse_version("0.20.0rc1") == (0, 20, 0)
    monkeypatch.setattr(ds, "package_version", lambda name: "0.19.2")
    with pytest.raises(StrategyUnavailable, match=r"deepspeed>=0\.19\.3, found 0\.19\.2"):
        ds.check_available()
    monkeypatch.setattr(ds, "package_version", lambda name: "0.19.3")
    ds.check_available()


def test_zero_accumulates_gradients_in_fp32() -> None:
    from launcher.train.strategies.deepspeed import deepspeed_config

    train = SimpleNamespace(micro_batch_size=2, grad_accum=4, grad_clip=1.0)
    for stage in ("zero1", "zero2", "zero3"):
        strategy = SimpleNamespace(name=stage, offload_optimizer=False, offload_params=False)
        ds_config = deepspeed_config(strategy, train, world_size=8, precision="bf16", device_type="cuda")
        assert ds_config["data_types"] == {"grad_accum_dtype": "fp32"}


def test_cluster_jobs_build_deepspeed_ops_on_node_local_storage() -> None:
    for name in ("lumi_setup.sh", "leonardo_setup.sh"):
        text = (REPO / "slurm_templates" / name).read_text()
        line = next(line for line in text.splitlines() if line.startswith("export TORCH_EXTENSIONS_DIR="))
        assert "/tmp/" in line and "${SLURM_JOB_ID}" in line, line


_TIMEOUT_PROBE = """
import json, sys
from torch.distributed import distributed_c10d as c10d
from launcher.train import distributed as D
env = D.setup(None)
group = c10d.new_group([0])
print(json.dumps({"default": c10d._get_default_timeout("gloo").total_seconds(),
                  "expected": D.collective_timeout_s()}))
"""


def test_groups_created_after_setup_get_the_jobs_timeout() -> None:
    out = subprocess.run([sys.executable, "-c", _TIMEOUT_PROBE], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                        "LAUNCHER_DIST_TIMEOUT_S": "1234", "LAUNCHER_DIST_INIT_TIMEOUT_S": "60"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"default": 1234.0, "expected": 1234.0}
    assert timedelta(seconds=result["default"]) != timedelta(minutes=30)  # torch's own default


def _grad_bytes(tmp_path: Path, accum: int, *extra: str) -> dict:
    out = tmp_path / f"grad-{accum}-{'-'.join(extra) or 'sync'}.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "scripts" / "fsdp_grad_memory.py"), str(accum), str(out), *extra],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp_gradient_accumulation_keeps_gradients_sharded(tmp_path: Path) -> None:
    one, four = _grad_bytes(tmp_path, 1), _grad_bytes(tmp_path, 4)
    assert four["grad_bytes"] <= 1.1 * one["grad_bytes"], (one, four)
    assert one["grad_bytes"] == pytest.approx(4 * one["n_params"] / 2, rel=0.01)  # fp32, half per rank
    # What the measurement sees when the sync is skipped until the last micro-batch (the old behaviour): the
    # unsharded fp32 gradients on top of the shard.
    skipped = _grad_bytes(tmp_path, 4, "skip-sync")
    assert skipped["grad_bytes"] >= 1.9 * one["grad_bytes"], skipped
