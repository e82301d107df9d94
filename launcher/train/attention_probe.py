"""Which scaled-dot-product attention kernels this GPU really has, against what the memory plan assumed.

The login node's memory plan (``launcher.plan.fit``) assumes flash attention on every GPU: PyTorch SDPA's flash or
memory-efficient kernel, whose activations have no ``a * s^2 * b`` score term. Whether that holds depends on the GPU,
the PyTorch build (ROCm: flash and memory-efficient SDPA come from AOTriton) and the call. Training calls SDPA the way
transformers' ``sdpa_attention_forward`` does:

- unpadded batches: no mask, ``is_causal=True``, and for GQA models (fewer K/V heads than Q heads) ``enable_gqa=True``:
  the flash kernel;
- padded batches (instruction and chat data): a boolean mask, K/V expanded to all heads: the memory-efficient kernel
  (flash takes no mask on GPUs).

``probe_attention(device)`` runs each of those calls under one kernel only (``torch.nn.attention.sdpa_kernel``) and
compares the result with the math kernel in fp32 on the same inputs; ``attention_findings`` turns the outcome into
warning lines that say what it means for memory and what to do. Called by every rank in the preflight
(``launcher.train.preflight.run_preflight``) on CUDA and ROCm devices (ROCm devices are ``cuda`` to torch); on CPU
there is nothing to check (the plan counts the score term there).

Module import is stdlib only: torch is imported inside the functions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from launcher.config.schema import ModelConfig

# Tolerances of a kernel's output against the fp32 math reference, per dtype of the kernel's inputs:
# |out - ref| <= atol + rtol * |ref|, elementwise. bf16 has an 8-bit mantissa (rounding 2^-9 = 0.2%); outputs are
# weighted means of V (|ref| up to ~3 with standard normal inputs), and flash keeps the probabilities in bf16 for P @ V.
TOLERANCES = {"bf16": (2e-2, 1.6e-2), "fp16": (5e-3, 5e-3), "fp32": (1e-4, 1e-4)}

# The probe's shapes: small (well under a millisecond a call on any GPU) but past the kernels' tiling edge cases.
PROBE_BATCH = 2
PROBE_SEQ_LEN = 256
PROBE_KV_HEADS = 2
DEFAULT_HEAD_DIM = 128
DEFAULT_GQA_RATIO = 4  # used when the model has no GQA: the check is about the kernel, not this model
MAX_HEAD_DIM = 256  # what flash SDPA supports


@dataclass
class KernelCheck:
    """One SDPA call under one backend, compared with the math backend in fp32."""

    backend: str  # a torch.nn.attention.SDPBackend name
    call: str  # what was called, e.g. "gqa causal" or "bool mask"
    ran: bool = False
    ok: bool = False  # ran and agreed within the tolerance
    max_abs_diff: Optional[float] = None
    tolerance: str = ""
    error: Optional[str] = None


@dataclass
class AttentionProbe:
    """What one rank's GPU did; ``errors`` holds each failed call's reason."""

    device_name: str
    runtime: str = ""  # "cuda 12.4" | "rocm 6.2.41133" | "cpu"
    arch: str = ""  # "sm_90" | "gfx90a" | ""
    dtype: str = "bf16"
    head_dim: int = DEFAULT_HEAD_DIM
    q_heads: int = PROBE_KV_HEADS * DEFAULT_GQA_RATIO
    kv_heads: int = PROBE_KV_HEADS
    flash_enabled: bool = False  # torch.backends.cuda.flash_sdp_enabled()
    efficient_enabled: bool = False  # torch.backends.cuda.mem_efficient_sdp_enabled()
    flash_available: bool = False  # enabled, and a causal call ran under the flash kernel alone and agreed
    flash_gqa_ok: bool = False  # a causal GQA call (enable_gqa=True) ran under the flash kernel alone and agreed
    efficient_masked_ok: bool = False  # boolean- and additive-masked calls ran under the efficient kernel and agreed
    max_abs_diff: Optional[float] = None  # the largest difference from the math reference among the calls that ran
    checks: List[KernelCheck] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def is_rocm(self) -> bool:
        return self.runtime.startswith("rocm")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AttentionProbe":
        values = dict(data)
        values["checks"] = [c if isinstance(c, KernelCheck) else KernelCheck(**c) for c in values.get("checks") or []]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


# ---------------------------------------------------------------------------------------------------------------
# The comparison (runs on any device: the CPU tests use it with the CPU's kernels)


def _error_text(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}"


def _dtype(torch: Any, name: str) -> Any:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def make_inputs(device: Any, *, dtype: str = "bf16", batch: int = PROBE_BATCH, q_heads: int = 8, kv_heads: int = 2,
                seq_len: int = PROBE_SEQ_LEN, head_dim: int = 64, mask: Optional[str] = None,
                seed: int = 0) -> Dict[str, Any]:
    """Seeded q, k, v (made in fp32 on the CPU, then rounded to ``dtype`` on ``device``) and an optional mask.

    ``mask``: None, ``"bool"`` (causal and right padding, True = attend: the shape of transformers' masks) or
    ``"additive"`` (the same pattern as 0 / -inf-like floats in ``dtype``). No row is fully masked.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(batch, heads, seq_len, head_dim, generator=gen)
               for name, heads in (("q", q_heads), ("k", kv_heads), ("v", kv_heads))}
    out = {name: t.to(device=device, dtype=_dtype(torch, dtype)) for name, t in tensors.items()}
    out["mask"] = None
    if mask is not None:
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        # Each sequence b is padded on the right after seq_len - b * seq_len // 4 tokens (the first is unpadded).
        lengths = [max(1, seq_len - b * seq_len // 4) for b in range(batch)]
        keys = torch.stack([torch.arange(seq_len) < n for n in lengths])  # (batch, seq_len)
        allowed = causal[None, :, :] & keys[:, None, :]  # (batch, q, k): row i always sees key 0
        allowed = allowed[:, None, :, :]  # broadcast over heads
        if mask == "bool":
            out["mask"] = allowed.to(device)
        elif mask == "additive":
            low = torch.finfo(_dtype(torch, dtype)).min
            additive = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, low)
            out["mask"] = additive.to(device=device, dtype=_dtype(torch, dtype))
        else:
            raise ValueError(f"mask={mask!r}: use None, 'bool' or 'additive'")
    return out


def sdpa_call(inputs: Mapping[str, Any], *, causal: bool, gqa: bool, upcast: bool = False) -> Any:
    """``F.scaled_dot_product_attention`` on ``inputs`` as transformers calls it (K/V expanded when not ``gqa``)."""
    import torch
    import torch.nn.functional as F

    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
        mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
    kwargs: Dict[str, Any] = {}
    if gqa and q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    elif q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, **kwargs)


def compare_backends(device: Any, backends: Sequence[str], *, call: str = "gqa causal", dtype: str = "bf16",
                     q_heads: int = 8, kv_heads: int = 2, head_dim: int = 64, seq_len: int = PROBE_SEQ_LEN,
                     batch: int = PROBE_BATCH, seed: int = 0,
                     tolerance: Optional[tuple] = None) -> List[KernelCheck]:
    """Run one SDPA call under each of ``backends`` alone and compare it with the math backend in fp32.

    ``call``: ``"causal"`` (no mask, K/V heads expanded), ``"gqa causal"`` (no mask, ``enable_gqa=True``),
    ``"bool mask"`` or ``"additive mask"`` (K/V expanded, as transformers does for masked GQA). A backend that cannot
    take the call raises a RuntimeError ("No available kernel"), recorded in ``error``; so is any other failure.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = {"bool mask": "bool", "additive mask": "additive"}.get(call)
    causal, gqa = call in ("causal", "gqa causal"), call == "gqa causal"
    atol, rtol = tolerance or TOLERANCES[dtype]
    inputs = make_inputs(device, dtype=dtype, batch=batch, q_heads=q_heads, kv_heads=kv_heads, seq_len=seq_len,
                         head_dim=head_dim, mask=mask, seed=seed)
    results = [KernelCheck(backend=name, call=call, tolerance=f"atol {atol:g} + rtol {rtol:g} * |ref|")
               for name in backends]
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            reference = sdpa_call(inputs, causal=causal, gqa=gqa, upcast=True)
    except Exception as e:  # noqa: BLE001 - no reference: nothing can be compared
        for check in results:
            check.error = f"math reference failed: {_error_text(e)}"
        return results
    for check in results:
        try:
            backend = getattr(SDPBackend, check.backend)
            with sdpa_kernel([backend]):
                out = sdpa_call(inputs, causal=causal, gqa=gqa)
            if getattr(device, "type", None) == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - RuntimeError when no kernel fits; anything else is reported too
            check.error = _error_text(e)
            continue
        check.ran = True
        diff = (out.float() - reference).abs()
        finite = bool(torch.isfinite(out.float()).all())
        check.max_abs_diff = float(diff.max()) if finite else float("nan")
        check.ok = finite and bool((diff <= atol + rtol * reference.abs()).all())
        if not check.ok:
            check.error = (f"result differs from the math kernel: max |diff| {check.max_abs_diff:.3g} "
                           f"(tolerance {check.tolerance})" if finite else "result has NaN or Inf")
    return results


# ---------------------------------------------------------------------------------------------------------------
# The probe


def _model_value(model_cfg: Any, name: str) -> Any:
    """``model_cfg.name`` of a ``ModelConfig``, or ``model_cfg[name]`` of a mapping (None when absent)."""
    if isinstance(model_cfg, Mapping):
        return model_cfg.get(name)
    return getattr(model_cfg, name, None)


def probe_shape(model_cfg: Optional["ModelConfig | Mapping[str, Any]"] = None) -> Dict[str, int]:
    """Head dim and head counts for the probe: the model's head dim and GQA ratio, at most 2 K/V heads."""
    head_dim = DEFAULT_HEAD_DIM
    ratio = DEFAULT_GQA_RATIO
    try:
        hidden = int(_model_value(model_cfg, "hidden_size") or 0)
        heads = int(_model_value(model_cfg, "num_heads") or 0)
        kv = int(_model_value(model_cfg, "num_kv_heads") or heads or 0)
        if hidden and heads and hidden % heads == 0 and 0 < hidden // heads <= MAX_HEAD_DIM:
            head_dim = hidden // heads
        if kv and heads % kv == 0 and heads // kv > 1:
            ratio = heads // kv
    except (TypeError, ValueError, AttributeError):
        pass
    return {"head_dim": head_dim, "q_heads": PROBE_KV_HEADS * ratio, "kv_heads": PROBE_KV_HEADS}


def run_probe(device: Any, *, dtype: Optional[str] = None, head_dim: int = DEFAULT_HEAD_DIM,
              q_heads: int = PROBE_KV_HEADS * DEFAULT_GQA_RATIO, kv_heads: int = PROBE_KV_HEADS,
              seq_len: int = PROBE_SEQ_LEN) -> AttentionProbe:
    """The three checks on ``device``, whatever it is (``probe_attention`` calls it on GPUs only). Never raises."""
    t0 = time.perf_counter()
    import torch

    on_gpu = getattr(device, "type", None) == "cuda"
    hip = getattr(torch.version, "hip", None)
    probe = AttentionProbe(device_name="cpu", runtime="cpu", head_dim=head_dim, q_heads=q_heads, kv_heads=kv_heads)
    try:
        if on_gpu:
            props = torch.cuda.get_device_properties(device)
            probe.device_name = str(getattr(props, "name", "") or torch.cuda.get_device_name(device))
            probe.runtime = f"rocm {hip}" if hip else f"cuda {torch.version.cuda}"
            probe.arch = (str(getattr(props, "gcnArchName", "") or "").split(":")[0] if hip
                          else f"sm_{props.major}{props.minor}")
            bf16 = bool(torch.cuda.is_bf16_supported())
        else:
            bf16 = True
        probe.dtype = dtype or ("bf16" if bf16 else "fp16")
        probe.flash_enabled = bool(torch.backends.cuda.flash_sdp_enabled())
        probe.efficient_enabled = bool(torch.backends.cuda.mem_efficient_sdp_enabled())
    except Exception as e:  # noqa: BLE001 - a broken device: report it, the device check names it too
        probe.errors.append(f"device properties: {_error_text(e)}")
        probe.elapsed_s = time.perf_counter() - t0
        return probe
    shape = dict(dtype=probe.dtype, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, seq_len=seq_len)
    try:
        plain = compare_backends(device, ["FLASH_ATTENTION"], call="causal", **shape)
        gqa = compare_backends(device, ["FLASH_ATTENTION"], call="gqa causal", **shape)
        masked = [check for call in ("bool mask", "additive mask")
                  for check in compare_backends(device, ["EFFICIENT_ATTENTION"], call=call, **shape)]
    except Exception as e:  # noqa: BLE001 - e.g. torch without torch.nn.attention (< 2.3): nothing else can run
        probe.errors.append(f"sdpa probe: {_error_text(e)}")
        probe.elapsed_s = time.perf_counter() - t0
        return probe
    probe.checks = plain + gqa + masked
    probe.flash_available = probe.flash_enabled and all(c.ok for c in plain)
    probe.flash_gqa_ok = probe.flash_enabled and all(c.ok for c in gqa)
    probe.efficient_masked_ok = probe.efficient_enabled and all(c.ok for c in masked)
    diffs = [c.max_abs_diff for c in probe.checks if c.max_abs_diff is not None]
    probe.max_abs_diff = max(diffs) if diffs else None
    if not probe.flash_enabled:
        probe.errors.append("torch.backends.cuda.flash_sdp_enabled() is False")
    if not probe.efficient_enabled:
        probe.errors.append("torch.backends.cuda.mem_efficient_sdp_enabled() is False")
    probe.errors += [f"{c.backend} ({c.call}): {c.error}" for c in probe.checks if c.error]
    probe.elapsed_s = time.perf_counter() - t0
    return probe


def probe_attention(device: Any, model_cfg: Optional["ModelConfig | Mapping[str, Any]"] = None
                    ) -> Optional[AttentionProbe]:
    """``run_probe`` on a CUDA or ROCm device with the model's head shape; None on any other device (nothing to
    check: the plan assumes no flash kernel there)."""
    if getattr(device, "type", None) != "cuda":
        return None
    return run_probe(device, **probe_shape(model_cfg))


# ---------------------------------------------------------------------------------------------------------------
# What it means (pure: tests feed fabricated probes)



def _fallback_hint(probe: AttentionProbe) -> str:
    if probe.is_rocm:
        arch = probe.arch or "this GPU"
        return (f"on ROCm, flash and memory-efficient SDPA come from AOTriton: use the container image's PyTorch ROCm "
                f"build (the official ROCm wheels ship AOTriton for MI250X/gfx90a and MI300), not a CPU or source "
                f"build without it; for an architecture AOTriton marks experimental ({arch}) set "
                f"TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1 in cluster.env (docs/containers.md)")
    return ("on CUDA, flash SDPA needs an Ampere or newer GPU (sm_80+, A100/H100) and bf16/fp16 inputs with "
            "head_dim <= 256: check the image's PyTorch CUDA build (docs/containers.md)")


MEMORY_HINT = ("activations will be larger than the memory plan (it counted flash attention): the math kernel "
               "keeps the a*s^2*b attention scores of every layer, the eager estimate; if the dry run's eager "
               "numbers would not fit, lower train.micro_batch_size or train.seq_len, or set "
               "model.gradient_checkpointing=true")


def attention_findings(probe: Optional[AttentionProbe | Mapping[str, Any]], planner_assumes_flash: bool) -> List[str]:
    """Warning lines (each: what failed, what it means, what to do); empty when the assumption holds or on CPU."""
    if probe is None:
        return []
    if not isinstance(probe, AttentionProbe):
        probe = AttentionProbe.from_dict(probe)
    where = f"{probe.device_name} ({probe.runtime}{', ' + probe.arch if probe.arch else ''}, {probe.dtype})"
    lines: List[str] = []
    wrong = [c for c in probe.checks if c.ran and not c.ok]
    for c in wrong:
        lines.append(f"attention kernel {c.backend} gives wrong results on {where} for a {c.call} call: {c.error}; "
                     "training on it is unsafe: exclude the node if other ranks agree, else rebuild the image's "
                     "PyTorch (docs/containers.md)")
    if not probe.checks and probe.errors:
        lines.append(f"attention probe could not run on {where}: {probe.errors[0]}")
        return lines
    if not planner_assumes_flash:
        return lines  # the plan counted the score term: no memory surprise, only wrong results matter
    flash_error = next((c.error for c in probe.checks if c.backend == "FLASH_ATTENTION" and c.error), None)
    if not probe.flash_enabled:
        flash_error = "torch.backends.cuda.flash_sdp_enabled() is False"
    flash_wrong = any(c.backend == "FLASH_ATTENTION" for c in wrong)
    if flash_wrong:
        pass  # said above: a wrong kernel matters more than the memory plan
    elif not probe.flash_available:
        fallback = ("the memory-efficient kernel (the same memory as planned, slower)" if probe.efficient_masked_ok
                    else "the math kernel")
        lines.append(f"flash attention is not available on {where}: {flash_error or 'see preflight.json'}; SDPA falls "
                     f"back to {fallback}" + ("" if probe.efficient_masked_ok else f"; {MEMORY_HINT}")
                     + f"; {_fallback_hint(probe)}")
    elif not probe.flash_gqa_ok:
        lines.append(f"flash attention rejects GQA ({probe.q_heads} query heads on {probe.kv_heads} key/value heads, "
                     f"enable_gqa=True) on {where}: {flash_error or 'see preflight.json'}; models with fewer key/value "
                     f"than query heads fall back to "
                     + ("the memory-efficient kernel (the same memory as planned, slower)" if probe.efficient_masked_ok
                        else f"the math kernel; {MEMORY_HINT}")
                     + f"; {_fallback_hint(probe)}")
    if not probe.efficient_masked_ok and not any(c.backend == "EFFICIENT_ATTENTION" for c in wrong):
        error = next((c.error for c in probe.checks if c.backend == "EFFICIENT_ATTENTION" and c.error), None)
        if not probe.efficient_enabled:
            error = "torch.backends.cuda.mem_efficient_sdp_enabled() is False"
        lines.append(f"the memory-efficient attention kernel cannot take a masked call on {where}: "
                     f"{error or 'see preflight.json'}; padded batches (instruction and chat data) use the math "
                     f"kernel: {MEMORY_HINT}; {_fallback_hint(probe)}")
    return lines


def record_findings(records: Sequence[Mapping[str, Any]], *, planner_assumes_flash: bool) -> List[Dict[str, Any]]:
    """Preflight findings (dicts with ``launcher.train.preflight.Finding``'s fields) from each rank's
    ``record["attention"]``.

    Identical lines from several ranks become one finding that names the ranks."""
    from launcher.train.preflight.records import format_ints

    by_line: Dict[str, List[int]] = {}
    for record in sorted(records, key=lambda r: r["rank"]):
        for line in attention_findings(record.get("attention"), planner_assumes_flash):
            by_line.setdefault(line, []).append(int(record["rank"]))
    total = len(records)
    return [{"level": "warn", "check": "attention",
             "message": f"rank(s) {format_ints(ranks)} of {total}: {line}", "ranks": ranks,
             "hint": "the probe's calls and errors per rank are under records[*].attention in preflight.json"}
            for line, ranks in by_line.items()]
