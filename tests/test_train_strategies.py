"""Training end to end on CPU with 2 processes: every strategy x (full, LoRA), equivalence, exports, fine-tuning.

Tolerances: strategies are compared step by step on the first 5 losses with a relative tolerance of 1e-5 (measured
over several runs: at most 1.4e-7 relative from ddp, full and LoRA; fsdp always, the others often, bit-identical).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

import pytest
from conftest import STRATEGIES, TrainLauncher, check_ok, losses, records

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")]

EQUIVALENCE_RTOL = 1e-5


def _generate(model, tokenizer) -> list:
    import torch

    inputs = tokenizer("The", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_full_training_learns_and_exports(full_runs: Dict[str, Path], strategy: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = full_runs[strategy]
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 9))
    assert curve[8] < curve[1] - 0.5, curve
    evals = [r for r in records(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    line = next(r for r in records(run_dir) if r.get("step") == 1 and "loss" in r)
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "elapsed_s"):
        assert line[key] is not None and math.isfinite(line[key]), key
    # Checkpoints every 4 steps, both kept (keep_last=2), each marked complete.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-8"]
    assert (run_dir / "checkpoints" / "step-8" / "COMPLETE").is_file()

    export = run_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(_generate(model, tokenizer)) > 0


def test_strategies_give_the_same_losses(full_runs: Dict[str, Path]) -> None:
    reference = losses(full_runs["ddp"])
    worst = {}
    for strategy in STRATEGIES[1:]:
        curve = losses(full_runs[strategy])
        worst[strategy] = max(abs(curve[s] - reference[s]) / abs(reference[s]) for s in range(1, 6))
    assert all(diff <= EQUIVALENCE_RTOL for diff in worst.values()), worst


def test_exports_agree_across_strategies(full_runs: Dict[str, Path]) -> None:
    """The consolidated exports of sharded strategies (zero3, fsdp) hold the same model as ddp's replica."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 33).unsqueeze(0)
    logits = {
        s: AutoModelForCausalLM.from_pretrained(full_runs[s] / "export")(input_ids=ids).logits for s in STRATEGIES
    }
    for strategy in STRATEGIES[1:]:
        assert torch.allclose(logits[strategy], logits["ddp"], rtol=1e-3, atol=1e-3), strategy


@pytest.fixture(scope="module")
def lora_runs(train_launcher: TrainLauncher, deepspeed_ops: None) -> Dict[str, Path]:
    runs = {}
    for strategy in STRATEGIES:
        merge = ["peft.merge_on_export=true"] if strategy in ("ddp", "zero3") else []
        run_dir = train_launcher.make_run(
            f"lora-{strategy}", [f"strategy={strategy}", "peft=lora", "train.max_steps=6", "train.lr=1e-2", *merge]
        )
        check_ok(train_launcher.spawn(run_dir))
        runs[strategy] = run_dir
    return runs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_trains_and_exports_an_adapter(lora_runs: Dict[str, Path], strategy: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = lora_runs[strategy]
    curve = losses(run_dir)
    assert curve[6] < curve[1], curve
    export = run_dir / "export"
    adapter_config = json.loads((export / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((export / "base_model").resolve())
    base = AutoModelForCausalLM.from_pretrained(export / "base_model")
    model = PeftModel.from_pretrained(base, export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(_generate(model, tokenizer)) > 0
    # The adapter changed something: B matrices start at zero.
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    if (export / "merged").is_dir():
        merged = AutoModelForCausalLM.from_pretrained(export / "merged")
        ids = torch.arange(1, 17).unsqueeze(0)
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_lora_losses_agree_across_strategies(lora_runs: Dict[str, Path], strategy: str) -> None:
    reference = losses(lora_runs["ddp"])
    curve = losses(lora_runs[strategy])
    diff = max(abs(curve[s] - reference[s]) / abs(reference[s]) for s in range(1, 6))
    assert diff <= EQUIVALENCE_RTOL, (strategy, diff)


def test_finetune_from_a_pretraining_export(full_runs: Dict[str, Path], train_launcher: TrainLauncher) -> None:
    """The offline from_pretrained path: model and tokenizer from the directory a pretraining run exported."""
    from transformers import AutoModelForCausalLM

    pretrained = full_runs["ddp"] / "export"
    run_dir = train_launcher.make_run(
        "finetune-from-export",
        ["strategy=zero2", "data=instruction", f"model.pretrained={pretrained}", "train.max_steps=4",
         "train.seq_len=128", "train.micro_batch_size=2", "train.eval_every=0", "train.save_every=0"],
    )
    check_ok(train_launcher.spawn(run_dir))
    assert not (run_dir / "tokenizer").exists(), "the tokenizer must come from model.pretrained"
    curve = losses(run_dir)
    scratch_start = losses(full_runs["ddp"])[1]
    assert curve[1] < scratch_start, (curve, scratch_start)  # starts from trained weights, not from a random init
    assert curve[4] < curve[1]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(pretrained).config.vocab_size


def test_seq_len_above_max_positions_fails_early(train_launcher: TrainLauncher) -> None:
    # The job's own check (a pretrained model's limit is only known once its config is read): past the login node's.
    run_dir = train_launcher.make_run("bad-seq-len", ["train.seq_len=1024"], login_checks=False)
    result = train_launcher.single(run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train.seq_len" in result.stderr and "max_position_embeddings=512" in result.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_missing_lora_targets_list_the_module_names(train_launcher: TrainLauncher) -> None:
    # The job's own check, against the modules the model really has (a pretrained one's are unknown on the login node).
    run_dir = train_launcher.make_run("bad-lora", ["peft=lora", "peft.target_modules=[query,value]"], login_checks=False)
    result = train_launcher.single(run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "['query', 'value'] not found" in result.stderr
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in result.stderr


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_bf16_with_gradient_checkpointing(train_launcher: TrainLauncher, deepspeed_ops: None, strategy: str) -> None:
    """The GPU settings (bf16 mixed precision, activation checkpointing) run on CPU too; saves can be timed."""
    from transformers import AutoModelForCausalLM

    run_dir = train_launcher.make_run(
        f"bf16-{strategy}",
        [f"strategy={strategy}", "strategy.precision=bf16", "model.gradient_checkpointing=true", "train.max_steps=5",
         "train.save_every=0", "train.save_every_minutes=0.00001", "train.eval_every=0"],
    )
    check_ok(train_launcher.spawn(run_dir))
    curve = losses(run_dir)
    assert curve[5] < curve[1]
    # Saves on time (agreed on one step after they fall due) and the final one, each logged with its duration.
    saves = [r for r in records(run_dir) if r.get("event") == "checkpoint"]
    steps = [r["step"] for r in saves]
    assert len(steps) >= 2 and steps[-1] == 5 and all(r["save_s"] > 0 for r in saves), saves
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{s}" for s in steps[-2:]]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert str(model.dtype) == "torch.bfloat16"
