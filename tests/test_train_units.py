"""Fast unit tests of the training stack (one process, no process group)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from launcher.train import distributed as D  # noqa: E402
from launcher.train import topology as T  # noqa: E402
from launcher.train.checkpoint import (  # noqa: E402
    COMPLETE, STATE_FILE, CheckpointManager, config_hash, training_config,
)
from launcher.config.strategies import strategy_spec  # noqa: E402
from launcher.train.metrics import flops_per_token, truncate_history  # noqa: E402
from launcher.train.schedule import WarmupCosine  # noqa: E402

# ------------------------------------------------------------------------------------------------- rendezvous


@pytest.mark.parametrize(
    "nodelist,first",
    [("nid005001", "nid005001"), ("nid[005001-005004,005010]", "nid005001"), ("lrdn[0003,0007-0009]", "lrdn0003"),
     ("a01,b02", "a01"), ("gpu[12-13],cpu[1-2]", "gpu12"), ("node[7]", "node7")],
)
def test_first_host_of_a_slurm_nodelist(nodelist: str, first: str) -> None:
    assert T.first_host(nodelist) == first


def test_topology_from_torchrun_variables() -> None:
    topo = T.topology_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h",
                                "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (topo.rank, topo.local_rank, topo.world_size, topo.master_addr, topo.master_port, topo.source) == (
        3, 1, 4, "h", 1234, "torchrun")


def test_topology_from_slurm_uses_the_batch_scripts_rendezvous() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "nid[001-002]", "MASTER_ADDR": "nid001", "MASTER_PORT": "23456"}
    topo = T.topology_from_env(env)
    assert (topo.rank, topo.local_rank, topo.world_size, topo.master_addr, topo.master_port, topo.source) == (
        5, 1, 8, "nid001", 23456, "slurm")


def test_topology_from_slurm_without_master_falls_back_to_the_nodelist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T.shutil, "which", lambda name: None)  # no scontrol inside a container
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "987654", "SLURM_JOB_NODELIST": "lrdn[0042-0043]"}
    topo = T.topology_from_env(env)
    # The batch script's rule (slurm_templates/common_setup.sh), from launcher.rundir.
    assert topo.master_addr == "lrdn0042" and topo.master_port == 10000 + 987654 % 10000


def test_a_single_process_is_a_world_of_one() -> None:
    topo = T.topology_from_env({})
    assert (topo.rank, topo.world_size, topo.source) == (0, 1, "single") and topo.master_port > 0


def test_visible_devices_var_is_set_per_task_but_slurms_cuda_binding_is_kept() -> None:
    env: dict = {}
    assert T.select_visible_device("ROCR_VISIBLE_DEVICES", 3, env)
    assert env == {"ROCR_VISIBLE_DEVICES": "3"}
    env = {"ROCR_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    T.select_visible_device("ROCR_VISIBLE_DEVICES", 5, env)
    assert env["ROCR_VISIBLE_DEVICES"] == "5"
    env = {"CUDA_VISIBLE_DEVICES": "2", "SLURM_JOB_ID": "1"}
    assert T.select_visible_device("CUDA_VISIBLE_DEVICES", 1, env)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert not T.select_visible_device(None, 1, env)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


@pytest.mark.parametrize("environ, tasks", [
    ({"SLURM_NTASKS_PER_NODE": "8"}, 8),
    ({"SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1"}, 4),  # --ntasks=8 over 2 nodes, no --ntasks-per-node
    ({"SLURM_TASKS_PER_NODE": "8(x2),4", "SLURM_NODEID": "2"}, 4),
    ({}, None),
])
def test_tasks_on_this_node_reads_slurms_per_node_counts(environ: dict, tasks: int) -> None:
    assert T.tasks_on_this_node(environ) == tasks
    env = dict(environ, SLURM_PROCID="0", SLURM_NTASKS="16", MASTER_ADDR="h", MASTER_PORT="1")
    T.prepare_environment(None, env)
    assert env["LOCAL_WORLD_SIZE"] == str(tasks or 16)  # before: the world size on every multi-node job


def test_collective_timeout_stays_below_the_walltime_left() -> None:
    full = max(D.COLLECTIVE_TIMEOUT_S, D.INIT_TIMEOUT_S)
    assert D.collective_timeout_s({}, now=1000.0) == full  # no time limit known
    assert D.collective_timeout_s({"LAUNCHER_JOB_END_EPOCH": "0"}, now=1000.0) == full
    left = {"LAUNCHER_JOB_END_EPOCH": str(1000 + 900), "LAUNCHER_SIGNAL_LEAD_S": "300"}
    assert D.collective_timeout_s(left, now=1000.0) == 600  # 900 s left, 300 s of them for the final save
    close = {"LAUNCHER_JOB_END_EPOCH": str(1000 + 200), "LAUNCHER_SIGNAL_LEAD_S": "300"}
    assert D.collective_timeout_s(close, now=1000.0) == D.MIN_COLLECTIVE_TIMEOUT_S
    assert D.collective_timeout_s({"LAUNCHER_JOB_END_EPOCH": "900"}, now=1000.0) == full  # in the past: unknown


def test_stop_signals_only_set_the_flag() -> None:
    D.clear_stop()
    restore = D.install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert D.stop_requested() and D.stop_reason() == "SIGUSR2"
        D.clear_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert D.stop_requested() and D.stop_reason() == "SIGTERM"
        D.clear_stop()
        os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C asks for a checkpoint
        assert D.stop_reason() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second one interrupts
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        restore()
        D.clear_stop()
    D.request_stop()
    assert D.stop_requested()
    D.clear_stop()


# ------------------------------------------------------------------------------------------------- schedule, MFU


def test_warmup_then_cosine_to_the_minimum() -> None:
    f = WarmupCosine(warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [f(i) for i in range(4, 20)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(3) == 1.0 and math.isclose(f(19), 0.1) and f(100) == pytest.approx(0.1)
    assert WarmupCosine(warmup_steps=0, max_steps=10, min_lr_ratio=0.0)(0) == 1.0


def test_flops_per_token_is_6n_plus_attention_and_less_for_lora() -> None:
    full = {"total": 1000, "trainable": 1000, "embedding": 100}
    assert flops_per_token(full, num_layers=2, hidden_size=8, seq_len=16) == 6 * 900 + 12 * 2 * 8 * 16
    lora = {"total": 1000, "trainable": 10, "embedding": 100}
    assert flops_per_token(lora, num_layers=2, hidden_size=8, seq_len=16) == 4 * 900 + 2 * 10 + 12 * 2 * 8 * 16


def test_metrics_history_is_cut_back_to_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.1},
             {"step": 3, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')  # a line cut by a crash
    assert truncate_history(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]


# ------------------------------------------------------------------------------------------------- deepspeed config


def _cfg(strategy: str, **strategy_overrides):
    """(strategy section, train section) of a composed config."""
    from launcher.config import compose

    overrides = [f"strategy={strategy}", "train.micro_batch_size=4", "train.grad_accum=3", "train.grad_clip=0.5"]
    overrides += [f"strategy.{k}={v}" for k, v in strategy_overrides.items()]
    cfg = compose(overrides)
    return cfg.strategy, cfg.train


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_follows_ours(stage: int) -> None:
    pytest.importorskip("deepspeed")
    from launcher.train.strategies.deepspeed import deepspeed_config

    ds = deepspeed_config(*_cfg(f"zero{stage}"), world_size=8, precision="bf16", device_type="cuda")
    assert ds["zero_optimization"]["stage"] == stage
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 3, 96)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and ds["zero_allow_untested_optimizer"]
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    cpu = deepspeed_config(*_cfg(f"zero{stage}"), world_size=2, precision="fp32", device_type="cpu")
    assert not cpu["bf16"]["enabled"]


def test_deepspeed_offload_settings() -> None:
    pytest.importorskip("deepspeed")
    from launcher.train.strategies.deepspeed import deepspeed_config

    ds = deepspeed_config(*_cfg("zero3", offload_optimizer=True, offload_params=True), world_size=4, precision="bf16",
                          device_type="cuda")
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_buckets_scale_with_hidden_size(stage: int) -> None:
    """Hugging Face's "auto" sizes from h (not DeepSpeed's fixed 5e8-element buckets); unset without h."""
    pytest.importorskip("deepspeed")
    from launcher.train.strategies.deepspeed import deepspeed_config

    zero = deepspeed_config(*_cfg(f"zero{stage}"), world_size=2, precision="fp32", device_type="cpu",
                            hidden_size=1024)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024 * 1024
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1024 * 1024)
        assert zero["stage3_param_persistence_threshold"] == 10 * 1024
        layer = 12 * 1024 * 1024  # about one decoder layer
        units = ("sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance")
        assert [zero[key] for key in units] == [layer] * 3
        assert "allgather_bucket_size" not in zero
    else:
        assert zero["allgather_bucket_size"] == 1024 * 1024
        assert not any(key.startswith("stage3_") for key in zero) and "sub_group_size" not in zero
    small = deepspeed_config(*_cfg(f"zero{stage}"), world_size=2, precision="fp32", device_type="cpu",
                             hidden_size=64)["zero_optimization"]
    assert small["reduce_bucket_size"] == 1 << 20  # the floor: a small model stays in a few collectives
    unsized = deepspeed_config(*_cfg(f"zero{stage}"), world_size=2, precision="fp32", device_type="cpu")
    assert not {"reduce_bucket_size", "allgather_bucket_size", "sub_group_size"} & set(unsized["zero_optimization"])


def test_share_fp32_master_aliases_same_dtype_partitions_only() -> None:
    pytest.importorskip("deepspeed")
    import torch

    from launcher.train.strategies.deepspeed import share_fp32_master

    weights = [torch.arange(4.0), torch.arange(3.0).bfloat16()]
    masters = [torch.nn.Parameter(w.clone().float()) for w in weights]
    optimizer = type("Stage3", (), {"fp16_partitioned_groups_flat": weights, "fp32_partitioned_groups_flat": masters,
                                    "offload_optimizer": False})()
    assert share_fp32_master(optimizer) == 1
    assert masters[0].data_ptr() == weights[0].data_ptr() and torch.equal(masters[0], torch.arange(4.0))
    assert masters[1].data_ptr() != weights[1].data_ptr()  # bf16 weights keep their fp32 master
    optimizer.offload_optimizer = True
    assert share_fp32_master(optimizer) == 0


# ------------------------------------------------------------------------------------------------- checkpoints


class _FakeStrategy:
    """What CheckpointManager reads of a strategy: its spec (name, resharding; the engine's checkpoint check)."""

    spec = strategy_spec("ddp")


def _env() -> D.DistEnv:
    return D.DistEnv(rank=0, local_rank=0, world_size=1, backend="gloo", device=torch.device("cpu"), source="single")


def _fake_checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    path = root / f"step-{step}"
    (path / "dcp").mkdir(parents=True)
    (path / "dcp" / ".metadata").write_bytes(b"m" * 10)
    (path / "dcp" / "__0_0.distcp").write_bytes(b"x" * 100)
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    if complete:
        files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
        (path / COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    return path


def test_newest_complete_checkpoint_wins_and_broken_ones_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 4)
    truncated = _fake_checkpoint(root, 6)
    (truncated / "dcp" / "__0_0.distcp").write_bytes(b"x" * 10)
    deleted = _fake_checkpoint(root, 8)
    (deleted / "dcp" / ".metadata").unlink()
    _fake_checkpoint(root, 10, complete=False)
    (root / "step-12.tmp").mkdir()
    manager = CheckpointManager(root, _env(), _FakeStrategy(), keep_last=2, keep_every=None)
    assert manager.find_latest() == root / "step-4"
    out = capsys.readouterr().out
    assert f"skipping checkpoint {root / 'step-10'}: no COMPLETE marker" in out
    assert f"skipping checkpoint {root / 'step-8'}: dcp/.metadata is missing" in out
    assert f"skipping checkpoint {root / 'step-6'}: dcp/__0_0.distcp is 10 bytes" in out
    assert "step-12.tmp" in out


def test_retention_keeps_the_last_k_and_every_mth(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10, 12):
        _fake_checkpoint(root, step)
    manager = CheckpointManager(root, _env(), _FakeStrategy(), keep_last=2, keep_every=4)
    manager.apply_retention()
    assert sorted(int(p.name[5:]) for p in root.iterdir()) == [4, 8, 10, 12]


def test_config_hash_ignores_bookkeeping_keys() -> None:
    from launcher.config import compose
    from omegaconf import OmegaConf

    def plain(overrides):
        return OmegaConf.to_container(compose(overrides), resolve=True)

    base = plain([])
    assert config_hash(base) == config_hash(plain(["train.max_steps=999", "train.save_every=7", "nproc_per_node=4"]))
    assert config_hash(base) != config_hash(plain(["train.lr=1e-4"]))
    assert "train.lr" in training_config(base) and "train.max_steps" not in training_config(base)


class _SavingStrategy(_FakeStrategy):
    """Writes one DCP-looking shard per save, like a strategy's ``save`` (and has a scheduler to record)."""

    def __init__(self) -> None:
        from launcher.train.schedule import build_scheduler

        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        self.scheduler = build_scheduler(optimizer, SimpleNamespace(warmup_steps=1, max_steps=4, min_lr_ratio=0.1))

    def save(self, directory: Path) -> None:
        (directory / "dcp").mkdir()
        (directory / "dcp" / ".metadata").write_bytes(b"m" * 7)
        (directory / "dcp" / "__0_0.distcp").write_bytes(b"x" * 1000)


def test_a_save_lists_every_file_once_and_records_the_scheduler(tmp_path: Path, monkeypatch) -> None:
    from launcher.train import checkpoint as C

    synced: list = []
    monkeypatch.setattr(C, "fsync_file", lambda path: synced.append(Path(path).name))
    manager = CheckpointManager(tmp_path, _env(), _SavingStrategy(), keep_last=2, keep_every=None)
    result = manager.save(3, {"sampler": {"offset": 8}})
    path = tmp_path / "step-3"
    files = json.loads((path / COMPLETE).read_text())["files"]
    assert sorted(files) == ["dcp/.metadata", "dcp/__0_0.distcp", "rng/rank-00000.pt", STATE_FILE]
    assert all((path / rel).stat().st_size == size for rel, size in files.items())
    on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert result["size_gb"] == pytest.approx(on_disk / 1e9, abs=0)
    assert synced == ["rank-00000.pt"]  # the rank's own RNG file; the strategy fsyncs what it wrote
    state = manager.read_state(path)
    assert state["strategy"] == "ddp" and state["sampler"] == {"offset": 8} and state["scheduler"]["last_epoch"] == 0
    assert manager.find_latest() == path


# ------------------------------------------------------------------------------------------------- the loop's batches


class _Split:
    """Notes which indices it collates; a batch is the indices themselves."""

    def __init__(self) -> None:
        self.calls: list = []

    def collate(self, indices, *, skip_full_mask: bool = False):
        self.calls.append(list(indices))
        return {"input_ids": torch.tensor([indices])}


def test_batches_drawn_ahead_leave_the_checkpointed_position_at_the_first_untrained_one() -> None:
    from launcher.train.batches import DeviceBatches
    from launcher.train.sampler import ResumableSampler

    def sampler():
        return ResumableSampler(64, global_batch_size=2, rank=0, world_size=1, seed=3)

    plain = DeviceBatches(_Split(), sampler(), torch.device("cpu"))
    ahead = DeviceBatches(_Split(), sampler(), torch.device("cpu"))
    ahead.ahead = True  # what a GPU does; the copies themselves stay on the CPU here
    for _ in range(5):
        assert torch.equal(plain.next()["input_ids"], ahead.next()["input_ids"])
        assert ahead.sampler_state() == plain.sampler_state() == plain.sampler.state_dict()
    assert len(ahead.split.calls) == 6 and len(plain.split.calls) == 5
    assert torch.equal(plain.next(more=False)["input_ids"], ahead.next(more=False)["input_ids"])
    assert ahead.sampler_state() == ahead.sampler.state_dict()  # nothing ahead after the last batch
    resumed = DeviceBatches(_Split(), sampler(), torch.device("cpu"))
    resumed.sampler.load_state_dict(plain.sampler_state())
    assert torch.equal(resumed.next()["input_ids"], plain.next()["input_ids"])


def test_packed_batches_without_padding_carry_no_attention_mask(tmp_path: Path) -> None:
    import numpy as np

    from launcher.train.data import IGNORE_INDEX, TokenizedSplit

    rows = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.save(tmp_path / "input_ids.npy", rows)
    np.save(tmp_path / "lengths.npy", np.array([4, 4, 2], dtype=np.int32))
    split = TokenizedSplit(tmp_path, packed=True)
    full = split.collate([0, 1], skip_full_mask=True)
    assert sorted(full) == ["input_ids", "labels"] and torch.equal(full["labels"], full["input_ids"])
    assert split.collate([0, 1])["attention_mask"].all()  # without skip_full_mask: a mask of ones, as before
    padded = split.collate([0, 2], skip_full_mask=True)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert padded["labels"][1].tolist() == [8, 9, IGNORE_INDEX, IGNORE_INDEX]


def test_the_stop_agreement_reuses_its_buffer() -> None:
    agreement = D.LaggedAgreement(torch.device("cpu"))
    assert agreement.collect() is None
    agreement.post([1.0, 0.0])
    buffer = agreement._host
    with pytest.raises(RuntimeError, match="collect"):
        agreement.post([0.0, 0.0])
    assert agreement.collect() == [1.0, 0.0]
    agreement.post([0.0, 1.0])
    assert agreement._host is buffer and agreement.collect() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------- model checks


@pytest.fixture(scope="module")
def tiny_model():
    from launcher.config import compose
    from launcher.train.modeling import build_model, hf_config
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(compose(["model=tiny"]).model)
    return build_model(model_cfg, config=hf_config(model_cfg), seed=0), model_cfg


def test_lora_with_missing_targets_lists_the_linear_modules(tiny_model) -> None:
    from launcher.train.modeling import ModelInputError, apply_peft

    model, _ = tiny_model
    peft_cfg = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "c_attn"]}
    with pytest.raises(ModelInputError) as err:
        apply_peft(model, peft_cfg, seed=0)
    message = str(err.value)
    assert "['c_attn'] not found in LlamaForCausalLM" in message
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message


def test_seq_len_above_the_position_table_is_refused(tiny_model) -> None:
    from launcher.errors import ConfigError
    from launcher.train.modeling import check_seq_len

    model, _ = tiny_model
    check_seq_len(512, model.config)
    with pytest.raises(ConfigError, match="max_position_embeddings=512"):
        check_seq_len(513, model.config)


def test_models_built_from_the_config_are_seeded(tiny_model) -> None:
    from launcher.train.modeling import build_model, hf_config

    model, model_cfg = tiny_model
    again = build_model(model_cfg, config=hf_config(model_cfg), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_ddp_autocasts_inside_the_model_for_training_and_evaluation(tmp_path: Path) -> None:
    """bf16 belongs to DDP alone: its forward (called by the loop for training and for eval) runs under autocast."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.train.strategies.ddp import DDPStrategy

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
        strategy_cfg = SimpleNamespace(name="ddp", precision="bf16", offload_optimizer=False, offload_params=False)
        train = SimpleNamespace(grad_accum=1, grad_clip=1.0, lr=1e-3, weight_decay=0.0, warmup_steps=1, max_steps=2,
                                min_lr_ratio=0.1)
        strategy = DDPStrategy(strategy_cfg, train, _env())
        strategy.wrap(LlamaForCausalLM(config))
        ids = torch.arange(8).unsqueeze(0)
        assert torch.isfinite(strategy.forward_backward({"input_ids": ids, "labels": ids}, last=True))
        assert torch.isfinite(strategy.step())
        strategy.model.eval()
        with torch.no_grad():
            assert strategy.model(input_ids=ids).logits.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in strategy.module.parameters())
    finally:
        dist.destroy_process_group()


def test_a_strategy_the_packages_cannot_run_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.train.strategies import StrategyUnavailable, strategy_class
    from launcher.train.strategies import deepspeed as ds_module

    monkeypatch.setattr(ds_module, "package_version", lambda name: None)
    with pytest.raises(StrategyUnavailable, match="needs deepspeed, which is not installed"):
        strategy_class("zero2")
    monkeypatch.setattr(ds_module, "package_version", lambda name: "0.9.5")
    with pytest.raises(StrategyUnavailable, match="found 0.9.5"):
        strategy_class("zero3")
    assert strategy_class("fsdp").__name__ == "FSDPStrategy"  # torch>=2.6 (pyproject): FSDP2 is always there


def test_the_strategy_interface_is_eight_methods() -> None:
    """torchtitan's six, plus where the model is built (low-memory loading) and a background save (async_save)."""
    import inspect

    from launcher.train.strategies import Strategy

    methods = {n for n, v in vars(Strategy).items() if inspect.isfunction(v) and not n.startswith("_")}
    assert methods == {"building", "wrap", "forward_backward", "step", "save", "save_async", "load",
                       "full_state_dict"}


def test_each_engine_checks_its_own_checkpoint_files(tmp_path: Path) -> None:
    from launcher.train.strategies import checkpoint_problem

    pytest.importorskip("deepspeed")
    _fake_checkpoint(tmp_path, 2)
    path = tmp_path / "step-2"
    assert checkpoint_problem(strategy_spec("ddp"))(path) is None
    assert checkpoint_problem(strategy_spec("fsdp"))(path) is None
    assert checkpoint_problem(strategy_spec("zero2"))(path) == f"{path / 'deepspeed'} is missing"
    (path / "deepspeed").mkdir()
    (path / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"m")
    assert checkpoint_problem(strategy_spec("zero3"))(path) == f"{path / 'deepspeed'} holds no optimizer states"


def test_torch_adamw_and_deepspeed_cpu_adam_get_the_same_groups() -> None:
    from launcher.train.strategies.base import ADAM_BETAS, ADAM_EPS, build_optimizer, param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert [[tuple(p.shape) for p in g["params"]] for g in groups] == [[(4, 4)], [(4,), (4,)]]  # no frozen norm weight
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    optimizer = build_optimizer(model, SimpleNamespace(weight_decay=0.1, lr=1e-3))
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 2]
    assert optimizer.defaults["betas"] == ADAM_BETAS and optimizer.defaults["eps"] == ADAM_EPS
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen, 0.1)


def test_ds_config_namespace_is_plain() -> None:
    # The strategies read the config by attribute (a dataclass, OmegaConf or a namespace): keep that working for tools.
    strategy = SimpleNamespace(name="zero2", offload_optimizer=False, offload_params=False)
    train = SimpleNamespace(micro_batch_size=2, grad_accum=1, grad_clip=1.0)
    pytest.importorskip("deepspeed")
    from launcher.train.strategies.deepspeed import deepspeed_config

    assert deepspeed_config(strategy, train, world_size=2, precision="fp32", device_type="cpu")["train_batch_size"] == 4


def test_resumed_schedule_takes_the_new_length_and_keeps_its_position() -> None:
    """Raising train.max_steps on resume stretches the cosine from the resumed step; same length: same lr exactly."""
    import json as _json

    from launcher.train.schedule import build_scheduler, restore_scheduler, scheduler_state

    def scheduler(max_steps: int):
        param = torch.nn.Parameter(torch.zeros(2, 2))
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        train = SimpleNamespace(lr=1e-3, warmup_steps=1, max_steps=max_steps, min_lr_ratio=0.1)
        return build_scheduler(optimizer, train)

    old = scheduler(4)
    for _ in range(2):
        old.optimizer.step()
        old.step()
    saved = _json.loads(_json.dumps(scheduler_state(old)))  # what trainer_state.json holds
    for max_steps in (4, 8):
        resumed = scheduler(max_steps)
        restore_scheduler(resumed, saved)
        expected = 1e-3 * WarmupCosine(warmup_steps=1, max_steps=max_steps, min_lr_ratio=0.1)(2)
        assert resumed.last_epoch == 2
        assert resumed.optimizer.param_groups[0]["lr"] == expected == resumed.get_last_lr()[0]
        if max_steps == 4:
            assert expected == old.get_last_lr()[0]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_the_jobs_flops_count_equals_the_login_nodes_for_llama_8b(peft: str) -> None:
    """One FLOPs count: the job counts the built model's parameters, the login node the config's numbers."""
    from transformers import AutoModelForCausalLM

    from launcher.config import validated
    from launcher.plan.fit import model_shape
    from launcher.plan.flops import flops_for_shape
    from launcher.train.metrics import count_parameters
    from launcher.train.modeling import apply_peft, hf_config

    cfg = validated(["model=llama-8b", "train.seq_len=4096", f"peft={peft}"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(cfg.model))
    shape = model_shape(cfg.model)
    lora = None
    if peft == "lora":
        model = apply_peft(model, cfg.peft, seed=0)
        lora = shape.lora_params(cfg.peft.r, target_modules=tuple(cfg.peft.target_modules))
    job = flops_per_token(count_parameters(model), num_layers=32, hidden_size=4096, seq_len=4096)
    assert job == flops_for_shape(shape, 4096, lora_params=lora)


def test_host_heap_threshold_is_set_unless_the_user_chose_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's mmap threshold: 128 KiB while the model loads, 32 MiB for the steps; MALLOC_MMAP_THRESHOLD_ wins."""
    import platform

    from launcher.train import host_heap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    steps = {"shards_parameters": False, "device_type": "cpu"}
    assert host_heap.for_the_load() and host_heap.for_the_steps(**steps)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not host_heap.for_the_load() and not host_heap.for_the_steps(**steps)


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_after() -> None:
    """Every zero* rank imports deepspeed; its autotuner would pull in mlflow (and pandas, fastapi) when installed.
    Run in a fresh interpreter: this one may hold either already."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    pytest.importorskip("mlflow")
    code = (
        "import sys; from launcher.train.strategies.deepspeed import import_deepspeed; import_deepspeed(); "
        "assert 'deepspeed' in sys.modules; assert 'mlflow' not in sys.modules and 'pandas' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'pandas'))[:5]; "
        "import mlflow; assert mlflow.__file__"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr[-2000:]
