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
from launcher.train.checkpoint import (  # noqa: E402
    COMPLETE, STATE_FILE, CheckpointManager, config_hash, training_config,
)
from launcher.train.metrics import flops_per_token, truncate_history  # noqa: E402
from launcher.train.schedule import WarmupCosine  # noqa: E402

# ------------------------------------------------------------------------------------------------- rendezvous


@pytest.mark.parametrize(
    "nodelist,first",
    [("nid005001", "nid005001"), ("nid[005001-005004,005010]", "nid005001"), ("lrdn[0003,0007-0009]", "lrdn0003"),
     ("a01,b02", "a01"), ("gpu[12-13],cpu[1-2]", "gpu12"), ("node[7]", "node7")],
)
def test_first_host_of_a_slurm_nodelist(nodelist: str, first: str) -> None:
    assert D.first_host(nodelist) == first


def test_topology_from_torchrun_variables() -> None:
    topo = D.topology_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h",
                                "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (topo.rank, topo.local_rank, topo.world_size, topo.master_addr, topo.master_port, topo.source) == (
        3, 1, 4, "h", 1234, "torchrun")


def test_topology_from_slurm_uses_the_batch_scripts_rendezvous() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "nid[001-002]", "MASTER_ADDR": "nid001", "MASTER_PORT": "23456"}
    topo = D.topology_from_env(env)
    assert (topo.rank, topo.local_rank, topo.world_size, topo.master_addr, topo.master_port, topo.source) == (
        5, 1, 8, "nid001", 23456, "slurm")


def test_topology_from_slurm_without_master_falls_back_to_the_nodelist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D.shutil, "which", lambda name: None)  # no scontrol inside a container
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "987654", "SLURM_JOB_NODELIST": "lrdn[0042-0043]"}
    topo = D.topology_from_env(env)
    # The batch script's rule (slurm_templates/common_setup.sh), from launcher.rundir.
    assert topo.master_addr == "lrdn0042" and topo.master_port == 10000 + 987654 % 10000


def test_a_single_process_is_a_world_of_one() -> None:
    topo = D.topology_from_env({})
    assert (topo.rank, topo.world_size, topo.source) == (0, 1, "single") and topo.master_port > 0


def test_visible_devices_var_is_set_per_task_but_slurms_cuda_binding_is_kept() -> None:
    env: dict = {}
    assert D.select_visible_device({"visible_devices_var": "ROCR_VISIBLE_DEVICES"}, 3, env)
    assert env == {"ROCR_VISIBLE_DEVICES": "3"}
    env = {"ROCR_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    D.select_visible_device({"visible_devices_var": "ROCR_VISIBLE_DEVICES"}, 5, env)
    assert env["ROCR_VISIBLE_DEVICES"] == "5"
    env = {"CUDA_VISIBLE_DEVICES": "2", "SLURM_JOB_ID": "1"}
    assert D.select_visible_device({"visible_devices_var": "CUDA_VISIBLE_DEVICES"}, 1, env)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert not D.select_visible_device({"visible_devices_var": None}, 1, env)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


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
    from launcher.config import compose

    overrides = [f"strategy={strategy}", "train.micro_batch_size=4", "train.grad_accum=3", "train.grad_clip=0.5"]
    overrides += [f"strategy.{k}={v}" for k, v in strategy_overrides.items()]
    return compose(overrides)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_follows_ours(stage: int) -> None:
    pytest.importorskip("deepspeed")
    from launcher.train.strategies.deepspeed import deepspeed_config

    ds = deepspeed_config(_cfg(f"zero{stage}"), world_size=8, precision="bf16", device_type="cuda")
    assert ds["zero_optimization"]["stage"] == stage
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 3, 96)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and ds["zero_allow_untested_optimizer"]
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    cpu = deepspeed_config(_cfg(f"zero{stage}"), world_size=2, precision="fp32", device_type="cpu")
    assert not cpu["bf16"]["enabled"]


def test_deepspeed_offload_settings() -> None:
    pytest.importorskip("deepspeed")
    from launcher.train.strategies.deepspeed import deepspeed_config

    ds = deepspeed_config(_cfg("zero3", offload_optimizer=True, offload_params=True), world_size=4, precision="bf16",
                          device_type="cuda")
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


# ------------------------------------------------------------------------------------------------- checkpoints


class _FakeStrategy:
    name = "ddp"

    def checkpoint_problem(self, directory: Path):
        return None if (directory / "dcp" / ".metadata").is_file() else "no dcp/.metadata"


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


def test_a_strategy_the_packages_cannot_run_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.train.strategies import StrategyUnavailable, strategy_class
    from launcher.train.strategies import deepspeed as ds_module

    monkeypatch.setattr(ds_module, "package_version", lambda name: None)
    with pytest.raises(StrategyUnavailable, match="needs deepspeed, which is not installed"):
        strategy_class("zero2")
    monkeypatch.setattr(ds_module, "package_version", lambda name: "0.9.5")
    with pytest.raises(StrategyUnavailable, match="found 0.9.5"):
        strategy_class("zero3")
    from launcher.train.strategies import fsdp as fsdp_module

    monkeypatch.setattr(fsdp_module, "_fsdp2", lambda: None)
    with pytest.raises(StrategyUnavailable, match="fully_shard"):
        strategy_class("fsdp")


def test_ds_config_namespace_is_plain() -> None:
    # The strategies read the config by attribute (OmegaConf or a namespace): keep that working for tools.
    ns = SimpleNamespace(strategy=SimpleNamespace(name="zero2", offload_optimizer=False, offload_params=False),
                         train=SimpleNamespace(micro_batch_size=2, grad_accum=1, grad_clip=1.0))
    pytest.importorskip("deepspeed")
    from launcher.train.strategies.deepspeed import deepspeed_config

    assert deepspeed_config(ns, world_size=2, precision="fp32", device_type="cpu")["train_batch_size"] == 4


def test_resumed_schedule_takes_the_new_length_and_keeps_its_position() -> None:
    """Raising train.max_steps on resume stretches the cosine from the resumed step; same length: same lr exactly."""
    import json as _json

    from launcher.train.schedule import build_scheduler
    from launcher.train.strategies.base import Strategy, _jsonable

    def scheduler(max_steps: int):
        param = torch.nn.Parameter(torch.zeros(2, 2))
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        train = SimpleNamespace(lr=1e-3, warmup_steps=1, max_steps=max_steps, min_lr_ratio=0.1)
        return build_scheduler(optimizer, train)

    old = scheduler(4)
    for _ in range(2):
        old.optimizer.step()
        old.step()
    saved = {"scheduler": _json.loads(_json.dumps(_jsonable(old.state_dict())))}
    for max_steps in (4, 8):
        fake = SimpleNamespace(scheduler=scheduler(max_steps))
        Strategy.load_state_for_checkpoint(fake, saved)  # type: ignore[arg-type]
        expected = 1e-3 * WarmupCosine(warmup_steps=1, max_steps=max_steps, min_lr_ratio=0.1)(2)
        assert fake.scheduler.last_epoch == 2
        assert fake.scheduler.optimizer.param_groups[0]["lr"] == expected == fake.scheduler.get_last_lr()[0]
        if max_steps == 4:
            assert expected == old.get_last_lr()[0]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_the_jobs_flops_count_equals_the_login_nodes_for_llama_8b(peft: str) -> None:
    """One FLOPs count: the job counts the built model's parameters, the login node the config's numbers."""
    from transformers import AutoModelForCausalLM

    from launcher.config import compose
    from launcher.config.schema import as_container
    from launcher.plan.fit import model_shape
    from launcher.plan.flops import flops_for_shape
    from launcher.train.metrics import count_parameters
    from launcher.train.modeling import apply_peft, hf_config

    cfg = as_container(compose(["model=llama-8b", "train.seq_len=4096", f"peft={peft}"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(cfg["model"]))
    shape = model_shape(cfg["model"])
    lora = None
    if peft == "lora":
        model = apply_peft(model, cfg["peft"], seed=0)
        lora = shape.lora_params(cfg["peft"]["r"], target_modules=tuple(cfg["peft"]["target_modules"]))
    job = flops_per_token(count_parameters(model), num_layers=32, hidden_size=4096, seq_len=4096)
    assert job == flops_for_shape(shape, 4096, lora_params=lora)
