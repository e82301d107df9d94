"""Low-memory model construction (issue 15), on 2 CPU ranks and a tiny Llama.

One torchrun of this file (``_worker``) builds the model the way the job does (``strategy.building()``,
``build_model(placement=...)``, ``strategy.wrap``) for ddp, fsdp and zero3, from a checkpoint saved
with ``save_pretrained``, from the config, and with LoRA, and reports per rank:

- what the rank holds before wrap: fsdp's rank 1 only meta parameters, zero3's ranks only their partitions (no full
  tensor), ddp's ranks real weights (they load straight onto the device);
- the weights after wrap (``full_state_dict`` on rank 0), against the checkpoint file and the plain fp32 build;
- two training steps' losses, against ddp's.

The host-memory numbers on a 250M model are benchmarks/host_memory.py's (docs/memory-planner.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

CASES: List[Tuple[str, str, str]] = [  # (strategy, source, peft)
    ("ddp", "pretrained", "none"), ("fsdp", "pretrained", "none"), ("zero3", "pretrained", "none"),
    ("ddp", "config", "none"), ("fsdp", "config", "none"), ("zero3", "config", "none"),
    ("ddp", "pretrained", "lora"), ("fsdp", "pretrained", "lora"), ("zero3", "pretrained", "lora"),
]
RTOL = 1e-5  # as tests/test_train_strategies.py


def _held(model: Any) -> Dict[str, Any]:
    """What this rank holds before wrap: parameters on meta, ZeRO-3 partitions, or real full tensors."""
    params = [p for n, p in model.named_parameters() if "lora_" not in n]  # adapters: tiny, built on every rank
    return {
        "meta": all(p.is_meta for p in params),
        "partitioned": all(hasattr(p, "ds_numel") and p.numel() < p.ds_numel for p in params),
        "real": all(not p.is_meta and not hasattr(p, "ds_numel") for p in params),
    }


def _reference(model_cfg: Any, peft: Any) -> Dict[str, Any]:
    """The plain build (fp32 on CPU, no placement): what every rank built before issue 15."""
    from launcher.train.modeling import apply_peft, build_model, hf_config

    model = apply_peft(build_model(model_cfg, config=hf_config(model_cfg), seed=0), peft, seed=0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _compare(full: Dict[str, Any], reference: Dict[str, Any], checkpoint: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    from launcher.train.export import _base_key

    same = set(full) == set(reference) and all(full[k].float().equal(reference[k].float()) for k in reference)
    result = {"equal_reference": same}
    if checkpoint is not None:  # every base weight equals the file's
        base = {_base_key(k): v for k, v in full.items() if ".lora_" not in k}
        result["equal_checkpoint"] = set(base) == set(checkpoint) and all(
            base[k].float().equal(checkpoint[k].float()) for k in checkpoint)
    return result


def _case(env: Any, strategy_name: str, source: str, peft_name: str, checkpoint_dir: str) -> Dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from launcher.config.schema import ModelConfig, PeftConfig, StrategyConfig, TrainConfig
    from launcher.train import strategies
    from launcher.train.modeling import apply_peft, build_model, hf_config

    model_cfg = ModelConfig(pretrained=checkpoint_dir) if source == "pretrained" else ModelConfig(vocab_size=128)
    peft = PeftConfig(name=peft_name)
    train = TrainConfig(max_steps=2, warmup_steps=0, micro_batch_size=2, lr=1e-2)
    strategy = strategies.create(StrategyConfig(name=strategy_name), train, env)
    with strategy.building() as placement:
        model = build_model(model_cfg, config=hf_config(model_cfg), seed=0, placement=placement)
        model = apply_peft(model, peft, seed=0)
    result: Dict[str, Any] = {"held": _held(model)}
    strategy.wrap(model)
    full = strategy.full_state_dict()
    if env.is_main:
        checkpoint = load_file(str(Path(checkpoint_dir) / "model.safetensors")) if source == "pretrained" else None
        result.update(_compare(full, _reference(model_cfg, peft), checkpoint))
    torch.manual_seed(env.rank)
    batch = {"input_ids": torch.randint(0, 128, (2, 16))}
    batch["labels"] = batch["input_ids"].clone()
    result["losses"] = []
    for _ in range(2):
        result["losses"].append(float(strategy.forward_backward(batch, last=True)))
        strategy.step()
    return result


def _bf16_lora_shards(env: Any, checkpoint_dir: str) -> Dict[str, Any]:
    """fsdp + bf16 + LoRA: the dtypes of this rank's shards (frozen base and adapters) and two steps' losses."""
    import torch

    from launcher.config.schema import ModelConfig, PeftConfig, StrategyConfig, TrainConfig
    from launcher.train import strategies
    from launcher.train.modeling import apply_peft, build_model, hf_config

    model_cfg = ModelConfig(pretrained=checkpoint_dir)
    train = TrainConfig(max_steps=2, warmup_steps=0, micro_batch_size=2, lr=1e-2)
    strategy = strategies.create(StrategyConfig(name="fsdp", precision="bf16"), train, env)
    with strategy.building() as placement:
        model = apply_peft(build_model(model_cfg, config=hf_config(model_cfg), seed=0, placement=placement),
                           PeftConfig(name="lora"), seed=0)
    strategy.wrap(model)
    dtypes = {"frozen": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
              "trainable": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})}
    torch.manual_seed(env.rank)
    batch = {"input_ids": torch.randint(0, 128, (2, 16))}
    batch["labels"] = batch["input_ids"].clone()
    losses = []
    for _ in range(2):
        losses.append(float(strategy.forward_backward(batch, last=True)))
        strategy.step()
    return {"dtypes": dtypes, "losses": losses}


def _worker(out_dir: str, checkpoint_dir: str) -> None:
    from launcher.train import distributed as D

    env = D.setup(None)
    results = {"/".join(case): _case(env, *case, checkpoint_dir) for case in CASES}
    results["fsdp-bf16-lora"] = _bf16_lora_shards(env, checkpoint_dir)
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(results))
    D.teardown()


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory: pytest.TempPathFactory, train_launcher: Any,
                   deepspeed_ops: None) -> Dict[int, Dict[str, Any]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("low_memory")
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "checkpoint")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(root), str(root / "checkpoint")]
    done = subprocess.run(command, env=train_launcher.env({"DS_ACCELERATOR": "cpu"}), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return {rank: json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.parametrize("case", ["/".join(c) for c in CASES])
def test_each_rank_holds_only_what_its_strategy_needs(worker_results: Dict[int, Dict[str, Any]], case: str) -> None:
    from launcher.plan.host import load_rule

    strategy = case.split("/")[0]
    rank0, rank1 = worker_results[0][case]["held"], worker_results[1][case]["held"]
    if strategy == "fsdp":  # rank 0 reads the one full copy; rank 1 only shapes
        assert rank0["real"] and rank1["meta"], (rank0, rank1)
    elif strategy == "zero3":  # zero.Init: every rank only its partition, also rank 0 (it read the file)
        assert rank0["partitioned"] and rank1["partitioned"], (rank0, rank1)
    else:  # replicated: straight onto the device (CPU here)
        assert rank0["real"] and rank1["real"], (rank0, rank1)
    # The planner's description of the load (the dry run's "host load" line) is this behaviour.
    assert load_rule(strategy).copies == ("none" if strategy == "ddp" else "node")


@pytest.mark.parametrize("case", ["/".join(c) for c in CASES])
def test_loaded_weights_are_the_checkpoints_and_the_plain_builds(worker_results: Dict[int, Dict[str, Any]],
                                                                 case: str) -> None:
    result = worker_results[0][case]
    assert result["equal_reference"], case  # exactly what the fp32 build of every rank gave before
    if "/pretrained/" in case:
        assert result["equal_checkpoint"], case


@pytest.mark.parametrize("case", ["/".join(c) for c in CASES if c[0] != "ddp"])
def test_losses_agree_with_ddp(worker_results: Dict[int, Dict[str, Any]], case: str) -> None:
    reference_case = "/".join(["ddp", *case.split("/")[1:]])
    for rank in (0, 1):
        ours, ddp = worker_results[rank][case]["losses"], worker_results[rank][reference_case]["losses"]
        assert all(abs(a - b) <= RTOL * abs(b) for a, b in zip(ours, ddp)), (rank, ours, ddp)
        assert ours[1] != ours[0]  # the step changed the weights


def test_fsdp_shards_a_frozen_base_in_the_compute_dtype(worker_results: Dict[int, Dict[str, Any]]) -> None:
    """bf16 LoRA: the frozen base is sharded in bf16 (never stepped; every all-gather casts it to bf16 anyway), the
    adapters keep fp32 master shards; it trains."""
    import math

    for rank in (0, 1):
        result = worker_results[rank]["fsdp-bf16-lora"]
        assert result["dtypes"] == {"frozen": ["torch.bfloat16"], "trainable": ["torch.float32"]}, (rank, result)
        assert all(math.isfinite(x) for x in result["losses"]) and result["losses"][1] != result["losses"][0]


if __name__ == "__main__":  # one rank of the worker (torchrun)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker(sys.argv[1], sys.argv[2])
