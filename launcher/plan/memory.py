"""Per-device memory of data-parallel training: DDP, DeepSpeed ZeRO-1/2/3 and FSDP (full sharding).

Imported on the login node to choose a strategy before a job is submitted: stdlib only, never torch,
transformers or deepspeed. The formulas, their sources and their measured accuracy are in
``docs/memory-planner.md``; in short:

* Model states follow the ZeRO paper (Rajbhandari et al. 2019, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models"): mixed-precision Adam keeps 2 B of 16-bit parameters, 2 B of 16-bit gradients
  and K = 12 B of optimizer state (fp32 master weights, momentum, variance) per parameter. ZeRO-1 shards the
  optimizer state over the data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 / FSDP also the parameters.
* Activations count the tensors autograd saves for backward in a Llama decoder (Hugging Face ``LlamaModel``),
  in the style of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models";
  see ``activation_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from launcher.config.strategies import STRATEGY_NAMES, strategy_spec
from launcher.plan.devices import GIB, Device
from launcher.plan.shape import ModelShape

if TYPE_CHECKING:
    from launcher.plan.host import HostPlan

# The order in which ``recommend`` tries them (least communication first): the strategy table's.
STRATEGIES: tuple[str, ...] = STRATEGY_NAMES


@dataclass(frozen=True)
class _Bytes:
    """Bytes per parameter of each model state, and per activation element, in one precision."""

    param: int
    grad: int
    optim: int
    act: int


_PRECISIONS: dict[str, _Bytes] = {
    # Mixed precision: 16-bit params and grads; fp32 master copy + Adam momentum + variance = 12 B.
    "bf16": _Bytes(param=2, grad=2, optim=12, act=2),
    "fp16": _Bytes(param=2, grad=2, optim=12, act=2),
    # Pure fp32 (CPU runs): the parameters are the master copy, so Adam adds only momentum + variance.
    "fp32": _Bytes(param=4, grad=4, optim=8, act=4),
}

# QLoRA (peft=qlora): bitsandbytes NF4 stores 2 weights per byte in blocks of 64, each with an absmax; double
# quantization stores those as 8-bit values with one fp32 absmax per 256 of them (Dettmers et al. 2023, "QLoRA" 3).
NF4_BLOCKSIZE = 64
NF4_DQ_BLOCKSIZE = 256
NF4_BYTES_PER_PARAM = 0.5 + 1 / NF4_BLOCKSIZE + 4 / (NF4_BLOCKSIZE * NF4_DQ_BLOCKSIZE)  # 0.5159 (4.127 bits)
# Where QLoRA runs (launcher.config.check_values refuses the rest, with the reasons of docs/models.md): ddp only (ZeRO
# casts and partitions the 4-bit weights; our fsdp is FSDP2, which bitsandbytes' FSDP recipe does not cover), on the
# CUDA devices bitsandbytes' wheels support (its ROCm backend is not verified on LUMI's MI250X stack), and on CPU
# ranks with a bitsandbytes that has its CPU backend (QLORA_CPU_SINCE and later).
QLORA_STRATEGIES = ("ddp",)
QLORA_DEVICES = ("a100_64gb", "h100_80gb")
QLORA_CPU_SINCE = (0, 48)


def nf4_bytes(n_params: int) -> int:
    """Bytes of ``n_params`` weights in NF4 with double-quantized block constants."""
    return int(-(-n_params * NF4_BYTES_PER_PARAM // 1))


def qlora_quantized_params(shape: ModelShape) -> int:
    """The weights bitsandbytes quantizes: every linear layer of the decoder (embeddings, lm_head and norms stay)."""
    return shape.n_layers * (shape.layer_params() - 2 * shape.hidden_size)


def _qlora_note(quantized: int, frozen: int, largest: int) -> str:
    return (f"qlora: {quantized / 1e9:.2f}B base weights in NF4 at 0.5 B + absmax per {NF4_BLOCKSIZE} (8-bit, fp32 per "
            f"{NF4_DQ_BLOCKSIZE}) = {NF4_BYTES_PER_PARAM:.4f} B/param = {gib(nf4_bytes(quantized)):.2f} GiB; "
            f"{(frozen - quantized) / 1e9:.2f}B kept as for ddp (embeddings, lm_head, norms); one layer dequantized "
            f"to bf16 at a time ({gib(largest * 2):.2f} GiB)")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (one rank) at the peak of a training step."""

    strategy: str
    world_size: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    total: int
    offloaded: int = 0  # bytes per rank moved to host memory by offloading (not in ``total``)
    notes: tuple[str, ...] = ()

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer state: what DeepSpeed's estimators count."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total_gib(self) -> float:
        return gib(self.total)

    def gib(self, component: str = "total") -> float:
        """One component (``parameters``, ``gradients``, ``optimizer``, ``activations``, ``total``...) in GiB."""
        return gib(getattr(self, component))


def gib(n_bytes: int | float) -> float:
    """Bytes to GiB (2**30), the unit nvidia-smi / rocm-smi and the device table use."""
    return n_bytes / GIB


def _check_strategy(strategy: str) -> int:
    """How much ``strategy`` shards (0 nothing ... 3 parameters too)."""
    return strategy_spec(strategy).shards


def _check_precision(precision: str) -> _Bytes:
    try:
        return _PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(_PRECISIONS)}") from None


def _share(n_bytes: int, world_size: int, sharded: bool) -> int:
    # Rounded up: a shard never holds a fraction of a byte, and padding only adds.
    return -(-n_bytes // world_size) if sharded else n_bytes


def layer_activation_bytes(
    shape: ModelShape,
    seq_len: int,
    micro_batch_size: int = 1,
    *,
    precision: str = "bf16",
    flash_attention: bool = False,
) -> int:
    """Bytes one decoder layer saves for backward; see ``activation_bytes`` for the formula."""
    e = _check_precision(precision).act
    tokens = seq_len * micro_batch_size  # s * b
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    # Two RMSNorms: the input upcast to fp32 (for fp32 runs, the input itself) and the normalized value.
    norms = 2 * (4 + e) * tokens * h
    # Inputs of the q/k/v projections, of gate/up (the norm outputs) and of o_proj (the attention output).
    linear_inputs = e * tokens * (2 * h + q)
    mlp = 4 * e * tokens * i  # SwiGLU: gate out, up out, SiLU(gate), SiLU(gate)*up = down_proj input
    if flash_attention:
        # Q, K, V at their own width (K/V not expanded for GQA) and the fp32 log-sum-exp per head and token.
        attention = e * tokens * (q + 2 * kv) + 4 * shape.n_heads * tokens
    else:
        # Eager: repeat_kv expands K and V to all heads; softmax runs in fp32 and its output is kept, then cast
        # back to the working precision for probs @ V (the cast is a no-op in fp32).
        scores = shape.n_heads * seq_len * tokens  # a * s^2 * b
        attention = e * tokens * 3 * q + (4 + (e if e != 4 else 0)) * scores
    return norms + linear_inputs + mlp + attention


def activation_bytes(
    shape: ModelShape,
    seq_len: int,
    micro_batch_size: int = 1,
    *,
    gradient_checkpointing: bool = False,
    precision: str = "bf16",
    flash_attention: bool = False,
) -> int:
    """Activation bytes per rank at the start of backward, for a Hugging Face Llama-style decoder.

    Notation: s = seq_len, b = micro_batch_size, h = hidden_size, a = n_heads, q = a * head_dim,
    k = n_kv_heads * head_dim, i = intermediate_size, V = vocab_size, L = n_layers, e = bytes per element
    of the working precision (2 for bf16/fp16, 4 for fp32). Counted: every tensor autograd saves for backward
    (the method of Korthikanti et al. 2022), dropout absent (Llama trains without it). Per layer:

        RMSNorms (x2)       2 * (4 + e) * s*b*h        fp32 upcast of the input + normalized value
        linear inputs       e * s*b * (2h + q)         q/k/v input, gate/up input, o_proj input
        Q, K, V (eager)     3 * e * s*b*q              K, V expanded to all heads by repeat_kv
        softmax (eager)     (4 + e) * a * s^2 * b      fp32 probabilities + their cast (4 * a*s^2*b in fp32)
        Q, K, V (flash)     e * s*b * (q + 2k) + 4*a*s*b   (no s^2 term; log-sum-exp in fp32)
        SwiGLU MLP          4 * e * s*b*i              gate, up, SiLU(gate), product

    For bf16 with q = k = h this is s*b*h*(24 + 8*i/h + 6*a*s/h), to compare with Korthikanti's
    s*b*h*(34 + 5*a*s/h) for a GPT block (GeLU MLP with i = 4h, dropout masks, LayerNorm, fp16 softmax).
    Outside the layers: the final norm and lm_head input (4 + 2e) * s*b*h, the logits e * s*b*V (the model
    output stays alive until backward) and the fp32 log-softmax cross entropy saves, 4 * s*b*V.

    With gradient checkpointing each layer keeps only its input, e * s*b*h, and backward recomputes one
    layer at a time, so one layer's full activations are added once.

    Ignored as small: RMSNorm's 1/rms (4*s*b per norm), RoPE cos/sin tables, token ids.
    Measured against a real model in ``tests/test_memory_planner.py``.
    """
    if seq_len <= 0 or micro_batch_size <= 0:
        raise ValueError(f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}")
    e = _check_precision(precision).act
    tokens = seq_len * micro_batch_size
    layer = layer_activation_bytes(
        shape, seq_len, micro_batch_size, precision=precision, flash_attention=flash_attention
    )
    if gradient_checkpointing:
        layers = shape.n_layers * e * tokens * shape.hidden_size + layer
    else:
        layers = shape.n_layers * layer
    # A classifier (shape.num_labels) scores one position per sequence: b x num_labels logits instead of s*b*V.
    logits = micro_batch_size * shape.num_labels if shape.num_labels is not None else tokens * shape.vocab_size
    head = (4 + 2 * e) * tokens * shape.hidden_size + (e + 4) * logits
    return layers + head


def estimate_memory(
    n_params: int,
    strategy: str,
    world_size: int,
    *,
    shape: ModelShape | None = None,
    seq_len: int = 2048,
    micro_batch_size: int = 1,
    gradient_checkpointing: bool = False,
    precision: str = "bf16",
    lora_params: int | None = None,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    flash_attention: bool = False,
    quantized_params: int = 0,
) -> MemoryEstimate:
    """Peak bytes per rank of one training step with ``strategy`` over ``world_size`` data-parallel ranks.

    ``n_params`` is the model's parameter count (the frozen base when ``lora_params`` is given). Model states
    per parameter (ZeRO paper, K = 12): 2 B params + 2 B grads + 12 B Adam state in bf16/fp16, 4 + 4 + 8 B in
    fp32; sharded over ``world_size`` ranks: zero1 the optimizer state, zero2 also the gradients, zero3 and
    fsdp also the parameters. DDP is the exception: it keeps the fp32 model and autocasts, so in bf16/fp16 it holds
    4 + 2 B of weights (fp32 + the 16-bit forward copies), 4 B of fp32 gradients and 8 B of Adam moments: 18 B.
    FSDP reduce-scatters after every micro-batch, so gradient accumulation adds nothing (see launcher.train.strategies
    .fsdp).

    With ``shape``, zero3/fsdp also hold the largest module gathered whole (parameters and gradient, the
    convention of DeepSpeed's ``estimate_zero3_model_states_mem_needs``), and activations are estimated by
    ``activation_bytes``; without it activations are 0 and a note says so.

    LoRA (``lora_params`` = adapter parameters): the base is frozen, stored in the working precision (sharded
    only by zero3/fsdp) with no gradients or optimizer state; the adapters get the full 16 B (fp32: 16 B)
    accounting, sharded per stage. Activations are counted as for full fine-tuning (an upper bound).

    QLoRA (``quantized_params`` of the frozen base in NF4, ddp only): those weights take ``NF4_BYTES_PER_PARAM``
    instead of 4 + 2 B, plus one dequantized bf16 copy of the largest linear layer (transient).

    Offloading (DeepSpeed ZeRO-Offload): ``offload_optimizer`` moves the optimizer state to host memory, and
    with zero2/zero3/fsdp also the gradient shard (reduced gradients are copied to the host, where the
    optimizer step runs); zero1 keeps its full gradients until the step. ``offload_params`` (zero3/fsdp only)
    moves the parameter shards too. What moved is reported in ``offloaded``, not in ``total``.
    """
    stage = _check_strategy(strategy)
    b = _check_precision(precision)
    _check_counts(strategy, stage, world_size, n_params, lora_params, quantized_params, offload_optimizer,
                  offload_params)
    notes: list[str] = []
    parameters, gradients, optimizer = _model_states(strategy, stage, b, world_size, n_params, lora_params,
                                                     quantized_params, notes)
    if quantized_params:
        frozen = n_params if lora_params is not None else 0
        largest = max(shape.intermediate_size, shape.q_dim) * shape.hidden_size if shape else 0
        parameters += nf4_bytes(quantized_params) + largest * 2
        notes.append(_qlora_note(quantized_params, frozen, largest))
    offloaded = 0
    if offload_optimizer:
        moved_grads = gradients if stage >= 2 else 0
        offloaded += optimizer + moved_grads
        optimizer, gradients = 0, gradients - moved_grads
    if offload_params:
        offloaded += parameters
        parameters = 0
    if offloaded:
        notes.append("offload: the moved states are in host memory, not in the device totals")
    if stage == 3 and shape is not None:
        # The module being computed is gathered whole (and, when trainable, its full gradient before the
        # reduce-scatter). FSDP gathers a whole wrapped block, and prefetching holds the next one: a lower bound.
        largest = shape.largest_layer_params()
        parameters += largest * b.param
        gradients += largest * b.grad if lora_params is None else 0
    activations = 0
    if shape is None:
        notes.append("activations not estimated: pass shape=ModelShape(...)")
    else:
        activations = activation_bytes(shape, seq_len, micro_batch_size, gradient_checkpointing=gradient_checkpointing,
                                       precision=precision, flash_attention=flash_attention)
    return MemoryEstimate(
        strategy=strategy, world_size=world_size, parameters=parameters, gradients=gradients, optimizer=optimizer,
        activations=activations, total=parameters + gradients + optimizer + activations, offloaded=offloaded,
        notes=tuple(notes),
    )


def _check_counts(strategy: str, stage: int, world_size: int, n_params: int, lora_params: int | None,
                  quantized_params: int, offload_optimizer: bool, offload_params: bool) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if n_params < 0 or (lora_params is not None and lora_params < 0):
        raise ValueError(f"parameter counts must be non-negative, got n_params={n_params}, lora_params={lora_params}")
    if quantized_params and (stage != 0 or lora_params is None or not 0 < quantized_params <= n_params):
        raise ValueError(f"quantized_params needs ddp, LoRA adapters and at most n_params; got {quantized_params}")
    if offload_params and stage < 3:
        raise ValueError(f"offload_params needs sharded parameters (zero3 or fsdp); strategy {strategy!r} has none")
    if offload_optimizer and stage == 0:
        raise ValueError(f"offload_optimizer needs a ZeRO stage or fsdp; strategy {strategy!r} cannot offload")


def _model_states(strategy: str, stage: int, b: Any, world_size: int, n_params: int, lora_params: int | None,
                  quantized_params: int, notes: list[str]) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer) bytes per rank before offloading, QLoRA's 4-bit weights not included."""
    trainable, frozen = (n_params, 0) if lora_params is None else (lora_params, n_params)
    if stage == 0 and b.param < 4:
        # DDP trains the fp32 model under autocast: fp32 weights, fp32 gradients (views into the all-reduce buckets,
        # gradient_as_bucket_view), Adam's two fp32 moments, plus the 16-bit copy of every weight that autocast
        # makes for the forward and keeps for backward: 4 + 2, 4 and 8 bytes per parameter.
        notes.append("ddp: fp32 weights under autocast + their 16-bit copies (6 B/param), fp32 grads and Adam")
        return (trainable + frozen - quantized_params) * (4 + b.param), trainable * 4, trainable * 8
    parameters = _share(trainable * b.param, world_size, stage >= 3) + _share(
        (frozen - quantized_params) * b.param, world_size, stage >= 3)
    # DeepSpeed accumulates gradients in fp32 (data_types.grad_accum_dtype, like DDP and FSDP): 4 B, not 2.
    grad_bytes = 4 if strategy_spec(strategy).engine == "deepspeed" else b.grad
    return (parameters, _share(trainable * grad_bytes, world_size, stage >= 2),
            _share(trainable * b.optim, world_size, stage >= 1))


def estimate_for_model(shape: ModelShape, strategy: str, world_size: int, **kw: Any) -> MemoryEstimate:
    """``estimate_memory`` with the parameter count and activations taken from ``shape``."""
    return estimate_memory(shape.n_params(), strategy, world_size, shape=shape, **kw)


@dataclass(frozen=True)
class StrategyFit:
    """One strategy's estimate against a device's usable memory."""

    strategy: str
    estimate: MemoryEstimate
    fits: bool
    usable_bytes: int  # margin * device memory
    margin: float
    # Host memory per node (launcher.plan.host), when the caller planned it (launcher.plan.fit does for a profile);
    # ``host_low_memory``: the same under low-memory loading, while the job does not load that way yet.
    host: Optional["HostPlan"] = None
    host_low_memory: Optional["HostPlan"] = None

    @property
    def headroom_bytes(self) -> int:
        """Usable bytes left after the estimate; negative when it does not fit."""
        return self.usable_bytes - self.estimate.total

    @property
    def fits_node(self) -> bool:
        """Fits the device and, when planned, the node's host memory."""
        return self.fits and (self.host is None or self.host.fits)


def plan_strategies(
    shape: ModelShape,
    world_size: int,
    device: Device,
    *,
    margin: float = 0.9,
    seq_len: int = 2048,
    micro_batch_size: int = 1,
    gradient_checkpointing: bool = False,
    lora_params: int | None = None,
    precision: str = "bf16",
    flash_attention: bool = False,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    quantized_params: int = 0,
) -> list[StrategyFit]:
    """Every strategy of ``STRATEGIES`` (in that order) estimated for ``shape`` on ``world_size`` ``device``s.

    The offload flags apply to each strategy as far as it can offload (ddp nothing, zero1/zero2 the optimizer,
    zero3/fsdp also the parameters), so the table shows what the job would really hold. With ``quantized_params``
    (QLoRA) only ``QLORA_STRATEGIES`` are planned.

    ``margin`` is the fraction of device memory a plan may use: the rest is left for what the estimate does
    not model (allocator fragmentation, NCCL/RCCL buffers, CUDA/HIP context, framework buckets).
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin is the usable fraction of device memory, in (0, 1]; got {margin}")
    usable = int(margin * device.memory_bytes)
    fits = []
    for strategy in QLORA_STRATEGIES if quantized_params else STRATEGIES:
        spec = strategy_spec(strategy)
        estimate = estimate_for_model(
            shape,
            strategy,
            world_size,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            gradient_checkpointing=gradient_checkpointing,
            precision=precision,
            lora_params=lora_params,
            flash_attention=flash_attention,
            offload_optimizer=offload_optimizer and spec.can_offload_optimizer,
            offload_params=offload_params and spec.can_offload_params,
            quantized_params=quantized_params,
        )
        fits.append(StrategyFit(strategy, estimate, estimate.total <= usable, usable, margin))
    return fits


def recommend(fits: Iterable[StrategyFit]) -> str | None:
    """The strategy with the least communication that fits its device and, when planned, the node's host memory
    (order of ``STRATEGIES``); None if none fits."""
    fitting = {fit.strategy for fit in fits if fit.fits_node}
    return next((strategy for strategy in STRATEGIES if strategy in fitting), None)


def format_strategy_table(fits: Sequence[StrategyFit], device: Device) -> str:
    """A plain-text table of ``plan_strategies`` output (GiB per device, host GiB per node when planned) and the
    recommendation line: ``launcher.plan.table.format_strategy_table``."""
    from launcher.plan.table import format_strategy_table as format_table

    return format_table(fits, device)
