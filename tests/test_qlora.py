"""QLoRA (peft=qlora): the 4-bit memory plan, the refusals on the login node, and a GPU run where CUDA exists.

The plan is checked against the arithmetic written out here (NF4: 0.5 B per weight, one 8-bit absmax per 64 weights
and one fp32 absmax per 256 of those), not against the planner's own constants.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.plan.devices import GIB
from launcher.plan.fit import check_fits, memory_report, strategy_fits
from launcher.plan.job import make_plan
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, REPO, composed, config, run_launcher

LEONARDO_8B = ["+cluster=leonardo", LEONARDO_ACCOUNT, "model=llama-8b", "peft=qlora", "dry_run=true"]
ONE_A100 = ["cluster.gpus_per_node_requested=1", "train.seq_len=2048", "train.micro_batch_size=1",
            "model.gradient_checkpointing=true"]


def test_qlora_yaml_is_the_paper_recipe():
    cfg = config(LEONARDO_8B)
    assert cfg.peft.name == "qlora" and not cfg.peft.merge_on_export
    assert set(cfg.peft.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}


def test_llama_8b_on_one_a100_counts_four_bits_per_base_weight():
    cfg = config([*LEONARDO_8B, *ONE_A100])
    fits, device = strategy_fits(cfg, make_plan(cfg).world_size)
    assert [fit.strategy for fit in fits] == ["ddp"]  # the only strategy QLoRA runs with
    estimate = fits[0].estimate
    h, i, layers, vocab = 4096, 14336, 32, 128256
    quantized = layers * (2 * h * h + 2 * h * 1024 + 3 * h * i)  # q, o, k, v (GQA: 8 x 128), gate, up, down
    assert quantized == 6_979_321_856
    nf4 = math.ceil(quantized * (0.5 + 1 / 64 + 4 / (64 * 256)))  # 4.127 bits per weight
    kept = 2 * vocab * h + (2 * layers + 1) * h  # embeddings, lm_head, norms: fp32 + bf16 copies under autocast
    lora = layers * 16 * ((h + h) * 2 + (h + 1024) * 2 + (h + i) * 3)  # r=16 on the 7 linear layers
    assert estimate.parameters == (kept + lora) * 6 + nf4 + i * h * 2  # + one dequantized layer
    assert estimate.gradients == lora * 4 and estimate.optimizer == lora * 8
    assert 3.3 < nf4 / GIB < 3.4  # vs 13 GiB in bf16
    report = memory_report(cfg, 1)
    assert "6.98B base weights in NF4" in report and "0.5159 B/param = 3.35 GiB" in report, report
    assert "recommendation: ddp" in report and fits[0].fits, report
    check_fits(cfg, 1)  # fits: nothing refused


def test_qlora_needs_a_quarter_of_lora_s_weights():
    lora = strategy_fits(config([*LEONARDO_8B[:-2], "peft=lora", *ONE_A100]), 1)[0][0].estimate
    qlora = strategy_fits(config([*LEONARDO_8B, *ONE_A100]), 1)[0][0].estimate
    assert qlora.parameters < 0.25 * lora.parameters
    assert lora.total / GIB > 40 > qlora.total / GIB


def test_dry_run_prints_the_4bit_plan(tmp_path):
    result = run_launcher([*LEONARDO_8B, f"output_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qlora: 6.98B base weights in NF4" in result.stdout, result.stdout[-3000:]
    assert "zero3" not in result.stdout.split("device a100_64gb")[1].split("recommendation")[0]


@pytest.mark.parametrize("override,field,why", [
    ("strategy=zero2", "strategy.name", "DeepSpeed casts the module to bf16"),
    ("strategy=zero3", "strategy.name", "DeepSpeed casts the module to bf16"),
    ("strategy=fsdp", "strategy.name", "FSDP2"),
    ("peft.merge_on_export=true", "peft.merge_on_export", "rounds the adapters away"),
])
def test_refused_on_the_login_node_with_the_reason(override, field, why):
    with pytest.raises(ConfigError) as error:
        config([*LEONARDO_8B, override])
    assert error.value.field == field and why in str(error.value)


def test_refused_on_lumi_mi250x():
    with pytest.raises(ConfigError) as error:
        config(["+cluster=lumi", LUMI_ACCOUNT, "model=llama-8b", "peft=qlora", "dry_run=true"])
    assert error.value.field == "cluster.device" and "mi250x_gcd" in str(error.value)
    assert "peft=lora" in str(error.value)


def test_a_real_submission_needs_a_pretrained_base_and_no_export(tmp_path):
    with pytest.raises(ConfigError) as error:
        config([*LEONARDO_8B[:-1]])
    assert error.value.field == "model.pretrained" and "dry_run=true" in str(error.value)
    with pytest.raises(ConfigError) as error:
        config([*LEONARDO_8B[:-1], f"model.pretrained={tmp_path}"])
    assert error.value.field == "train.export" and "train.export=false" in str(error.value)


def test_cpu_ranks_need_bitsandbytes_cpu_backend_one_line(tmp_path):
    """Without a GPU, 4-bit runs on bitsandbytes' CPU backend (>= 0.48): an older one is refused before anything runs.
    The installed version is read from package metadata: a fake older one on PYTHONPATH stands in for it."""
    fake = tmp_path / "site"
    (fake / "bitsandbytes-0.45.0.dist-info").mkdir(parents=True)
    (fake / "bitsandbytes-0.45.0.dist-info" / "METADATA").write_text("Name: bitsandbytes\nVersion: 0.45.0\n")
    result = run_launcher(["model=tiny", "peft=qlora", f"output_dir={tmp_path}"], cwd=tmp_path,
                          env={"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{fake}{os.pathsep}{REPO}"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("launcher: error: peft.name=qlora"), result.stderr
    assert "bitsandbytes >= 0.48 for CPU ranks (installed here: 0.45.0)" in lines[0] and "Traceback" not in lines[0]


def test_missing_bitsandbytes_is_refused_where_the_job_s_python_is_visible():
    from launcher.config.check_values import check_packages

    tree = composed(["model=tiny", "peft=qlora"])
    with pytest.raises(ConfigError) as error:
        check_packages(tree, find=lambda name: None)
    assert "bitsandbytes installed" in str(error.value) and "eurohpc-launcher[qlora]" in str(error.value)
    # A container job: the image's packages matter, which the job checks when it starts.
    cluster = composed([*LEONARDO_8B])
    check_packages(cluster, find=lambda name: None)


def _bnb_cpu() -> bool:
    from launcher.config.check_values import _bnb_runs_on_cpu

    return _bnb_runs_on_cpu()


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _pretrained_base(path: Path) -> Path:
    """A tiny Llama and the launcher's own BPE tokenizer, saved as a pretrained directory (no download). Widths are
    multiples of 64: bitsandbytes' CPU inference path (evaluation) packs weights in blocks of that size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.train.tokenizer import train_bpe_tokenizer

    corpus = (REPO / "launcher" / "examples" / "corpus.txt").read_text().splitlines()
    train_bpe_tokenizer(corpus, 1024, max_length=512).save_pretrained(path)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
                     ).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not _bnb_cpu(), reason="needs bitsandbytes >= 0.48 (CPU)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not _cuda(), reason="bitsandbytes' CUDA kernels need a GPU")),
])
def test_qlora_trains_end_to_end(tmp_path, train_launcher, device):
    """2 CPU ranks (ddp, gloo) or 1 GPU: a 4-bit base from model.pretrained under r=16 adapters on 7 modules."""
    pytest.importorskip("bitsandbytes")
    from conftest import check_ok, losses

    base = _pretrained_base(tmp_path / "base")
    run_dir = train_launcher.make_run(f"qlora-{device}", [
        "peft=qlora", f"model.pretrained={base}", "model.intermediate_size=192", "train.export=false",
        "train.eval_every=8",
    ])
    result = train_launcher.spawn(run_dir, nproc=2 if device == "cpu" else 1,
                                     env={"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None)
    check_ok(result)
    assert "peft qlora" in result.stdout and "0.041M trainable" in result.stdout, result.stdout[-2000:]
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 9)) and all(math.isfinite(v) for v in curve.values())
    assert curve[8] < curve[1]  # the adapters learn on top of the frozen 4-bit base
    assert (run_dir / "checkpoints" / "step-8" / "COMPLETE").exists()
    assert "Traceback" not in result.stderr and "kernels-community" not in result.stderr
    # The checkpoint holds the adapters only (launcher.train.frozen_base): it resumes although the eval at step 8
    # repacked the 4-bit base in place, and two more steps continue the curve.
    from conftest import copy_run

    resumed = copy_run(run_dir, tmp_path / "qlora-resumed", {"train.max_steps": 10})
    check_ok(train_launcher.spawn(resumed, nproc=2 if device == "cpu" else 1,
                                     env={"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None))
    more = losses(resumed)
    assert sorted(more) == list(range(1, 11)) and all(more[s] == curve[s] for s in curve)
