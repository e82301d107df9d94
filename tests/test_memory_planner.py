"""Memory planner: hand-computed cases, DeepSpeed's own estimators, and activations measured on a real model.

The planner itself is stdlib only; these tests may import torch, transformers and deepspeed (lazily, so a
missing package skips only the tests that need it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.plan import (
    DEVICES,
    STRATEGIES,
    ModelShape,
    estimate_for_model,
    estimate_memory,
    format_strategy_table,
    get_device,
    plan_strategies,
    recommend,
)
from launcher.plan.memory import activation_bytes, layer_activation_bytes

REPO = Path(__file__).resolve().parents[1]
GB = 10**9

# Llama-style shapes of roughly 125M, 1.3B, 7B and 70B parameters (the last two are Llama-2's).
SHAPES = {
    "125m": ModelShape(12, 768, 12, 12, 2048, 32000),
    "1.3b": ModelShape(24, 2048, 16, 16, 5504, 32000),
    "7b": ModelShape(32, 4096, 32, 32, 11008, 32000),
    "70b": ModelShape(80, 8192, 64, 8, 28672, 32000),
}
WORLD_SIZES = (1, 8, 64)


# --- parameter counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, published",
    [
        (SHAPES["7b"], 6_738_415_616),  # Llama-2-7B
        (SHAPES["70b"], 68_976_648_192),  # Llama-2-70B
        (ModelShape(32, 4096, 32, 8, 14336, 128256), 8_030_261_248),  # Llama-3.1-8B
        (ModelShape(16, 2048, 32, 8, 8192, 128256, tie_embeddings=True), 1_235_814_400),  # Llama-3.2-1B
        (ModelShape(32, 4096, 32, 8, 14336, 32000), 7_241_732_096),  # Mistral-7B-v0.1
    ],
)
def test_n_params_matches_published_counts(shape: ModelShape, published: int) -> None:
    assert shape.n_params() == published


@pytest.mark.parametrize("tie, n_kv_heads", [(False, 4), (False, 2), (True, 2)])
def test_n_params_matches_transformers_llama(tie: bool, n_kv_heads: int) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config)
    assert ModelShape.from_config(config).n_params() == sum(p.numel() for p in model.parameters())


def test_from_config_reads_launcher_names() -> None:
    class Cfg:  # the attribute names of launcher.config.schema.ModelConfig
        num_layers, hidden_size, num_heads, num_kv_heads = 2, 64, 4, 4
        intermediate_size, vocab_size, tie_embeddings = 176, 1024, False

    assert ModelShape.from_config(Cfg()) == ModelShape(2, 64, 4, 4, 176, 1024)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a renamed transformers method
def test_lora_params_match_peft() -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config), peft.LoraConfig(r=8, target_modules=targets)
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_config(config).lora_params(8, targets) == trainable


# --- model states: hand-computed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy, params, grads, optim",
    [
        ("ddp", 6 * GB, 4 * GB, 8 * GB),  # 18 GB: fp32 weights + bf16 autocast copies, fp32 grads, Adam
        # DeepSpeed accumulates gradients in fp32 (grad_accum_dtype): 4 B per gradient, sharded from zero2 on.
        ("zero1", 2 * GB, 4 * GB, 12 * GB // 8),  # 7.5 GB
        ("zero2", 2 * GB, 4 * GB // 8, 12 * GB // 8),  # 4 GB
        ("zero3", 2 * GB // 8, 4 * GB // 8, 12 * GB // 8),  # 2.25 GB
        ("fsdp", 2 * GB // 8, 2 * GB // 8, 12 * GB // 8),  # 2 GB
    ],
)
def test_model_states_1b_on_8(strategy: str, params: int, grads: int, optim: int) -> None:
    est = estimate_memory(GB, strategy, 8)
    assert (est.parameters, est.gradients, est.optimizer) == (params, grads, optim)
    assert est.total == params + grads + optim and est.activations == 0
    assert est.notes and "shape" in est.notes[-1]
    assert (est.strategy, est.world_size) == (strategy, 8)


def test_world_size_one_shards_nothing() -> None:
    # DDP keeps fp32 weights under autocast (+2 B of bf16 copies); the others hold 16 B/param unsharded on one rank.
    assert {s: estimate_memory(GB, s, 1).total for s in STRATEGIES} == {
        "ddp": 18 * GB, "zero1": 18 * GB, "zero2": 18 * GB, "zero3": 18 * GB, "fsdp": 16 * GB}


def test_fp32_model_states() -> None:
    # 4 B params + 4 B grads + 8 B Adam (m, v): the fp32 params are their own master copy.
    assert estimate_memory(GB, "ddp", 8, precision="fp32").total == 16 * GB
    zero2 = estimate_memory(GB, "zero2", 8, precision="fp32")
    assert (zero2.parameters, zero2.gradients, zero2.optimizer) == (4 * GB, GB // 2, GB)
    assert estimate_memory(GB, "zero3", 8, precision="fp32").total == 2 * GB


def test_lora_model_states() -> None:
    base, lora = GB, 10_000_000

    def states(strategy: str, world_size: int = 8, **kw) -> tuple[int, int, int]:
        est = estimate_memory(base, strategy, world_size, lora_params=lora, **kw)
        return est.parameters, est.gradients, est.optimizer

    # Frozen base: 2 B/param, no gradients or optimizer; adapters: 2 + 2 + 12 B, sharded per stage.
    # ddp: the fp32 model under autocast, 4 + 2 B of weights (base and adapters), fp32 adapter grads and Adam moments.
    assert states("ddp") == (6 * (base + lora), 4 * lora, 8 * lora)
    assert states("zero2") == (2 * base + 2 * lora, 4 * lora // 8, 12 * lora // 8)  # fp32 gradient accumulation
    assert states("zero3") == ((2 * base + 2 * lora) // 8, 4 * lora // 8, 12 * lora // 8)
    assert states("ddp", 1, precision="fp32") == (4 * base + 4 * lora, 4 * lora, 8 * lora)


def test_offload() -> None:
    zero1 = estimate_memory(GB, "zero1", 8, offload_optimizer=True)
    assert (zero1.parameters, zero1.gradients, zero1.optimizer, zero1.offloaded) == (2 * GB, 4 * GB, 0, 12 * GB // 8)
    zero2 = estimate_memory(GB, "zero2", 8, offload_optimizer=True)  # the gradient shard goes to the host too
    assert (zero2.parameters, zero2.gradients, zero2.optimizer) == (2 * GB, 0, 0)
    assert zero2.offloaded == 16 * GB // 8
    zero3 = estimate_memory(GB, "zero3", 8, offload_optimizer=True, offload_params=True)
    assert (zero3.total, zero3.offloaded) == (0, 18 * GB // 8)
    fsdp = estimate_memory(GB, "fsdp", 8, offload_params=True)
    assert (fsdp.parameters, fsdp.gradients, fsdp.optimizer) == (0, 2 * GB // 8, 12 * GB // 8)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2"])
def test_offload_params_needs_sharded_params(strategy: str) -> None:
    with pytest.raises(ValueError, match=rf"offload_params.*zero3 or fsdp.*{strategy}"):
        estimate_memory(GB, strategy, 8, offload_params=True)


def test_offload_optimizer_needs_zero() -> None:
    with pytest.raises(ValueError, match="'ddp'"):
        estimate_memory(GB, "ddp", 8, offload_optimizer=True)


def test_invalid_arguments_name_allowed_values() -> None:
    with pytest.raises(ValueError, match="'zero4'.*ddp, zero1, zero2, zero3, fsdp"):
        estimate_memory(GB, "zero4", 8)
    with pytest.raises(ValueError, match="'fp8'.*bf16, fp16, fp32"):
        estimate_memory(GB, "ddp", 8, precision="fp8")
    with pytest.raises(ValueError, match="world_size"):
        estimate_memory(GB, "ddp", 0)
    with pytest.raises(ValueError, match="'tpu'.*a100_64gb, cpu, h100_80gb, mi250x_gcd"):
        get_device("tpu")
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelShape(2, 64, 4, 3, 176, 1000)
    with pytest.raises(ValueError, match="allowed: q_proj"):
        SHAPES["7b"].lora_params(8, ["qkv"])


def test_devices() -> None:
    assert set(DEVICES) == {"a100_64gb", "mi250x_gcd", "h100_80gb", "cpu"}
    assert get_device("a100_64gb").peak_bf16_tflops == 312.0
    assert get_device("mi250x_gcd").peak_bf16_tflops == 191.5
    assert get_device("h100_80gb").peak_bf16_tflops == 989.0
    assert get_device("mi250x_gcd").memory_bytes == 64 * 2**30
    assert get_device("cpu", memory_bytes=8 * 2**30).memory_bytes == 8 * 2**30


# --- model states: DeepSpeed's estimators ----------------------------------------------------------------
#
# deepspeed.runtime.zero.*.estimate_zero{2,3}_model_states_mem_needs (0.19.8) count per GPU, without offload:
#   ZeRO-2: 2*P + 18*P/N   (2 B fp16 params + [2 B fp16 grads + 4 B fp32 grads + 4 B fp32 params + 8 B Adam]/N)
#   ZeRO-3: 4*largest_layer + 18*P/N
# Ours: ZeRO-2 2*P + 14*P/N, ZeRO-3 4*largest_layer + 16*P/N (the largest-layer term is DeepSpeed's convention,
# copied). The systematic difference is in the sharded part: DeepSpeed counts 4 B/param/N more for ZeRO-2 (20 B
# in all at N=1 against the paper's 16) and 2 B/param/N more for ZeRO-3 (18 against 16). Its ZeRO-2 source
# comment attributes the extra 4 B to an fp32 gradient shard; that copy is
# made at the optimizer step, when activations are already freed, so it does not add to the activation peak we
# plan for. With the difference added back (4*P/N for ZeRO-2, 2*P/N for ZeRO-3) the two agree to rounding
# (a few bytes); without it ours is 0.800-0.973 of DeepSpeed's for ZeRO-2 (0.8 at N=1, 16/20) and
# 0.889-0.969 for ZeRO-3 over the sizes and world sizes below (asserted: >= 0.80 and >= 0.88, <= 1.0).


def _ds_layout(world_size: int) -> dict[str, int]:
    return {"num_gpus_per_node": min(world_size, 8), "num_nodes": max(world_size // 8, 1)}


@pytest.fixture(scope="module")
def ds_zero():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("size", SHAPES)
def test_zero2_agrees_with_deepspeed(ds_zero, size: str, world_size: int) -> None:
    zero2, _ = ds_zero
    shape = SHAPES[size]
    p = shape.n_params()
    _, ds_gpu = zero2(p, **_ds_layout(world_size), cpu_offload=False, additional_buffer_factor=1.0)
    ours = estimate_for_model(shape, "zero2", world_size).model_states
    # DeepSpeed also counts the 16-bit gradient shard beside the fp32 one we hold: 2 B/param/N.
    assert ours + 2 * p / world_size == pytest.approx(ds_gpu, abs=4)
    assert 0.80 <= ours / ds_gpu <= 1.0
    # Offloading the optimizer leaves the 16-bit parameters alone on the GPU, in both.
    _, ds_offload = zero2(p, **_ds_layout(world_size), cpu_offload=True, additional_buffer_factor=1.0)
    assert estimate_for_model(shape, "zero2", world_size, offload_optimizer=True).model_states == ds_offload


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("size", SHAPES)
def test_zero3_agrees_with_deepspeed(ds_zero, size: str, world_size: int) -> None:
    _, zero3 = ds_zero
    shape = SHAPES[size]
    p, largest = shape.n_params(), shape.largest_layer_params()
    common = {"zero_init": True, "additional_buffer_factor": 1.0, **_ds_layout(world_size)}
    _, ds_gpu, ds_largest = zero3(p, largest, cpu_offload=False, cpu_offload_params=False, **common)
    ours = estimate_for_model(shape, "zero3", world_size)
    assert ds_largest == 4 * largest  # the gathered-layer term we copy
    assert ours.model_states == pytest.approx(ds_gpu, abs=4)  # both: 18 B/param/N with fp32 gradients
    # FSDP2 keeps fp32 shards of weights, gradients and Adam (16 B/param/N): 2 B/param/N less than ZeRO-3.
    fsdp = estimate_for_model(shape, "fsdp", world_size).model_states
    assert fsdp == pytest.approx(ours.model_states - 2 * p / world_size, abs=4)
    _, ds_opt, _ = zero3(p, largest, cpu_offload=True, cpu_offload_params=False, **common)
    ours_opt = estimate_for_model(shape, "zero3", world_size, offload_optimizer=True).model_states
    assert ours_opt == pytest.approx(ds_opt, abs=4)
    _, ds_all, _ = zero3(p, largest, cpu_offload=True, cpu_offload_params=True, **common)
    ours_all = estimate_for_model(shape, "zero3", world_size, offload_optimizer=True, offload_params=True)
    assert ours_all.model_states == ds_all


# --- activations ------------------------------------------------------------------------------------------


def test_activation_formula_by_hand() -> None:
    # Llama-2-7B, s=2048, b=1, bf16, eager: per layer s*b*h*(24 + 8*i/h + 6*a*s/h).
    shape, s = SHAPES["7b"], 2048
    sbh = s * 4096
    per_layer = 24 * sbh + 8 * s * 11008 + 6 * 32 * s * s
    assert layer_activation_bytes(shape, s, 1) == per_layer
    head = 8 * sbh + (2 + 4) * s * 32000
    assert activation_bytes(shape, s, 1) == 32 * per_layer + head
    checkpointed = 32 * 2 * sbh + per_layer + head
    assert activation_bytes(shape, s, 1, gradient_checkpointing=True) == checkpointed
    assert estimate_for_model(shape, "ddp", 1, seq_len=s).activations == 32 * per_layer + head


def test_gradient_checkpointing_and_flash_reduce_activations() -> None:
    shape = SHAPES["7b"]
    full = estimate_for_model(shape, "zero2", 8, seq_len=4096).activations
    ckpt = estimate_for_model(shape, "zero2", 8, seq_len=4096, gradient_checkpointing=True).activations
    flash = estimate_for_model(shape, "zero2", 8, seq_len=4096, flash_attention=True).activations
    assert ckpt < full / 10 and flash < full / 3
    assert activation_bytes(shape, 4096, 2) > activation_bytes(shape, 4096, 1)


def _measure_saved_activations(precision: str, attn: str, checkpointing: bool = False) -> tuple[int, ModelShape]:
    """Bytes autograd keeps for backward in a tiny Llama (plus the logits output), deduplicated by storage."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = ModelShape(n_layers=2, hidden_size=128, n_heads=4, n_kv_heads=2, intermediate_size=344, vocab_size=1000)
    seq_len, batch = 128, 4
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads, max_position_embeddings=seq_len, attn_implementation=attn,
        use_cache=False,
    )  # fmt: skip
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = transformers.LlamaForCausalLM(config).to(dtype).train()
    if checkpointing:
        # transformers 5 renamed it; the old name still works but warns.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(0, shape.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    saved.setdefault(out.logits.untyped_storage().data_ptr(), out.logits.untyped_storage().nbytes())
    out.loss.backward()  # the graph is sound (and the hooks saw everything forward saved)
    return sum(saved.values()), shape


# Observed on torch 2.13 CPU / transformers 5.24: estimate / measured = 0.996-0.998 (the missing 0.3% are the
# small tensors the formula ignores: 1/rms per norm, RoPE cos/sin, token ids). We assert 0.95-1.05.
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_activation_estimate_matches_measured(precision: str, attn: str) -> None:
    measured, shape = _measure_saved_activations(precision, attn)
    estimate = activation_bytes(shape, 128, 4, precision=precision, flash_attention=attn == "sdpa")
    assert 0.95 <= estimate / measured <= 1.05, (estimate, measured)


def test_checkpointed_activations_match_measured() -> None:
    # Forward keeps each layer's input and the head; backward then recomputes one layer at a time, which the
    # estimate adds once (that part is checked by the test above).
    measured, shape = _measure_saved_activations("fp32", "eager", checkpointing=True)
    kept = activation_bytes(shape, 128, 4, gradient_checkpointing=True, precision="fp32")
    kept -= layer_activation_bytes(shape, 128, 4, precision="fp32")
    assert 0.95 <= kept / measured <= 1.05, (kept, measured)


# --- planning ---------------------------------------------------------------------------------------------


def test_plan_and_recommend() -> None:
    device = get_device("a100_64gb")
    shape = ModelShape(32, 4096, 32, 8, 14336, 32000)  # Mistral-7B
    fits = plan_strategies(shape, 16, device, seq_len=4096, gradient_checkpointing=True)
    assert [f.strategy for f in fits] == list(STRATEGIES)
    assert [f.fits for f in fits] == [False, True, True, True, True]
    assert recommend(fits) == "zero1"
    assert all(f.usable_bytes == int(0.9 * device.memory_bytes) for f in fits)
    # On one device only offloading or a bigger device could help.
    assert recommend(plan_strategies(shape, 1, device, seq_len=4096, gradient_checkpointing=True)) is None
    # A tighter margin pushes the choice to more sharding.
    tight = plan_strategies(shape, 4, device, seq_len=4096, gradient_checkpointing=True, margin=0.6)
    assert recommend(tight) == "zero3"
    with pytest.raises(ValueError, match="margin"):
        plan_strategies(shape, 4, device, margin=1.5)


def test_recommend_prefers_zero3_over_fsdp() -> None:
    fits = plan_strategies(SHAPES["70b"], 64, get_device("mi250x_gcd"), seq_len=4096, gradient_checkpointing=True)
    assert {f.strategy for f in fits if f.fits} == {"zero3", "fsdp"}
    assert recommend(fits) == "zero3"
    assert recommend(reversed(fits)) == "zero3"


def test_format_strategy_table() -> None:
    device = get_device("a100_64gb")
    shape = ModelShape(32, 4096, 32, 8, 14336, 32000)
    fits = plan_strategies(shape, 16, device, seq_len=4096, gradient_checkpointing=True)
    table = format_strategy_table(fits, device)
    assert table == format_strategy_table(fits, device)  # deterministic
    lines = table.splitlines()
    assert lines[0] == "device a100_64gb: 64.00 GiB, usable 57.60 GiB (margin 0.90), world size 16"
    assert lines[1].split(" | ") == ["strategy", "params", "grads", "optimizer", "activations", "total GiB", "fits"]
    assert [line.split()[0] for line in lines[3:8]] == list(STRATEGIES)
    assert lines[3].endswith("| no") and lines[4].endswith("| yes")
    assert lines[-1] == "recommendation: zero1 (least communication that fits)"
    none_fit = format_strategy_table(plan_strategies(shape, 1, device), device)
    assert none_fit.splitlines()[-1].startswith("recommendation: none fits")


# --- login-node import rule -------------------------------------------------------------------------------


def test_planning_imports_no_heavy_packages() -> None:
    heavy = ["torch", "transformers", "deepspeed", "accelerate", "peft", "datasets"]
    code = f"import launcher.plan, sys; bad = [m for m in {heavy!r} if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
