"""Requests that cannot run fail before submission, naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from launcher.errors import ConfigError
from launcher.plan.job import make_plan
from launcher.plan.slurm_time import format_time, parse_time
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, config


def error_for(overrides):
    from launcher.plan.fit import check_fits

    with pytest.raises(ConfigError) as caught:
        check_fits(config(overrides), 1)  # config() validates as the command line does
    return caught.value


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "nodes=5"], "nodes", ["1..4", "small-g"]),
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=dev-g", "nodes=33"], "nodes", ["1..32", "dev-g"]),
        (["+cluster=leonardo", LEONARDO_ACCOUNT, "nodes=65"], "nodes", ["1..64", "normal"]),
        (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.qos=boost_qos_dbg", "nodes=3"], "nodes", ["1..2"]),
        (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.qos=boost_qos_bprod", "nodes=8"], "nodes", ["65..256"]),
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=dev-g", "cluster.time=03:00:01"], "cluster.time",
         ["03:00:00", "dev-g"]),
        (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.time=1-00:00:01"], "cluster.time", ["1-00:00:00"]),
        (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.qos=boost_qos_dbg", "cluster.time=00:31:00"],
         "cluster.time", ["00:30:00"]),
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.time=soon"], "cluster.time", ["Slurm time"]),
        (["+cluster=lumi"], "cluster.account", ["project_"]),
        (["+cluster=lumi", "cluster.account=project_12"], "cluster.account", ["project_[0-9]{9}"]),
        (["+cluster=leonardo"], "cluster.account", ["required"]),
        (["+cluster=leonardo", "cluster.account=my account"], "cluster.account", ["matching"]),
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=standard"], "cluster.partition",
         ["standard-g", "small-g", "dev-g"]),
        (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.qos=fast"], "cluster.qos", ["boost_qos_dbg"]),
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.gpus_per_node_requested=16"], "cluster.gpus_per_node_requested",
         ["0..8"]),
        (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.gpus_per_node_requested=8"],
         "cluster.gpus_per_node_requested", ["0..4"]),
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.cpus_per_task=8"], "cluster.cpus_per_task", ["at most 7", "56"]),
        (["strategy=ddp", "strategy.name=zero4"], "strategy.name", ["zero3", "fsdp"]),
        (["strategy=zero2", "strategy.offload_params=true"], "strategy.offload_params", ["zero3"]),
        (["peft.name=dora"], "peft.name", ["lora", "qlora"]),
        (["data.format=parquet"], "data.format", ["instruction", "chat"]),
        (["train.seq_len=4096"], "train.seq_len", ["512"]),
        (["nodes=2"], "nodes", ["+cluster"]),
        (["train.micro_batch_size=0"], "train.micro_batch_size", [">= 1"]),
        (["data.path=/nonexistent/train.jsonl"], "data.path", ["existing file"]),
        (["model.pretrained=/nonexistent/llama"], "model.pretrained", ["existing local directory"]),
        (["peft=lora", "peft.target_modules=[q_proj,nope]"], "peft.target_modules", ["nope", "gate_proj"]),
    ],
)
def test_invalid_values_are_named(overrides, field, words):
    error = error_for(overrides)
    assert error.field == field
    for word in words:
        assert word in str(error), (word, str(error))


def test_secrets_in_cluster_env_are_refused_and_not_echoed():
    token = "hf_" + "a1B2" * 9
    error = error_for(["+cluster=lumi", LUMI_ACCOUNT, f"+cluster.env.HF_TOKEN={token}"])
    assert error.field == "cluster.env.HF_TOKEN" and token not in str(error)
    error = error_for([f"model.tokenizer={token}"])
    assert error.field == "model.tokenizer" and token not in str(error)


def test_control_characters_are_refused():
    error = error_for(["run_name='a\nb'"])
    assert error.field == "run_name" and "newlines" in str(error)


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("30:15", 1815), ("01:00:00", 3600), ("2-00:00:00", 172800),
                                           ("1-12", 129600), ("1-12:30", 131400)])
def test_slurm_time_formats(text, seconds):
    assert parse_time(text) == seconds
    assert parse_time(format_time(seconds)) == seconds


@pytest.mark.parametrize(
    "overrides, units",
    [
        (["+cluster=lumi", LUMI_ACCOUNT, "nodes=4"], 16.0),  # standard-g: 4 GPU-hours per node-hour
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "cluster.time=02:00:00"], 8.0),  # 8 GCDs x 0.5 x 2 h
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "cluster.gpus_per_node_requested=2",
          "cluster.tasks_per_node=2", "cluster.exclusive=false"], 1.0),
        (["+cluster=leonardo", LEONARDO_ACCOUNT, "nodes=2", "cluster.time=02:00:00"], 4.0),  # node-hours
        # a share of small-g pays for its share without being told (exclusive follows the request) ...
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "cluster.gpus_per_node_requested=2"], 1.0),
        # ... and cluster.exclusive=true holds (and pays for) the whole node even when fewer GCDs are asked for
        (["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "cluster.gpus_per_node_requested=2",
          "cluster.exclusive=true"], 4.0),
    ],
)
def test_billing_for_requested_walltime(overrides, units):
    cfg = config(overrides)
    assert make_plan(cfg).billing_units == pytest.approx(units)


def test_world_size_is_nodes_times_tasks():
    cfg = config(["+cluster=lumi", LUMI_ACCOUNT, "nodes=16"])
    plan = make_plan(cfg)
    assert (plan.world_size, plan.tasks_per_node, plan.gpus_per_node) == (128, 8, 8)
    cfg = config(["+cluster=leonardo", LEONARDO_ACCOUNT, "nodes=4"])
    assert make_plan(cfg).world_size == 16


def test_global_batch_size_derives_grad_accum_per_world_size():
    from launcher.config.validation import apply_global_batch

    base = ["+cluster=lumi", LUMI_ACCOUNT, "train.micro_batch_size=2", "train.global_batch_size=64"]
    for nodes, accum in ((1, 4), (2, 2), (4, 1)):
        cfg = config([*base, f"nodes={nodes}"])
        assert apply_global_batch(cfg, make_plan(cfg).world_size).train.grad_accum == accum
    cfg = config([*base, "nodes=8"])  # 64 devices x 2 > 64
    with pytest.raises(ConfigError) as error:
        apply_global_batch(cfg, make_plan(cfg).world_size)
    assert error.value.field == "train.global_batch_size" and "2 x 64" in str(error.value)


def test_hugging_face_snapshot_paths_are_not_mistaken_for_credentials(tmp_path):
    snapshot = tmp_path / "models--meta-llama--Llama-3.1-8B" / "snapshots" / ("0123456789abcdef" * 3)[:40]
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert config([f"model.pretrained={snapshot}"]).model.pretrained == str(snapshot)  # validated, not refused
    error = error_for(["+cluster=local_slurm", "+cluster.env.WANDB_KEYISH=" + "ab12" * 10])
    assert error.field == "cluster.env.WANDB_KEYISH"
