"""The attention probe of the GPU preflight (launcher.train.attention_probe) and the dry run's attention line.

Findings are checked on fabricated probes; the kernel comparison runs for real on this machine's CPU kernels (torch
2.13 on CPU: MATH and FLASH_ATTENTION run, with or without a mask and with enable_gqa; EFFICIENT_ATTENTION and
CUDNN_ATTENTION raise "No viable backend"), which exercises both the comparison and the no-kernel path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.plan.devices import planner_assumes_flash
from launcher.plan.job import make_plan
from launcher.plan.summary import cluster_summary, planned_attention
from launcher.train import attention_probe as A
from launcher.train.attention_probe import AttentionProbe, KernelCheck, attention_findings, record_findings
from login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, REPO, config


def probe(**overrides) -> AttentionProbe:
    """A probe of a healthy MI250X GCD; overrides break parts of it."""
    checks = [KernelCheck("FLASH_ATTENTION", "causal", True, True, 4e-3),
              KernelCheck("FLASH_ATTENTION", "gqa causal", True, True, 4e-3),
              KernelCheck("EFFICIENT_ATTENTION", "bool mask", True, True, 5e-3),
              KernelCheck("EFFICIENT_ATTENTION", "additive mask", True, True, 5e-3)]
    values = dict(device_name="AMD Instinct MI250X", runtime="rocm 6.2.41133", arch="gfx90a", dtype="bf16",
                  flash_enabled=True, efficient_enabled=True, flash_available=True, flash_gqa_ok=True,
                  efficient_masked_ok=True, max_abs_diff=5e-3, checks=checks)
    values.update(overrides)
    return AttentionProbe(**values)


NO_KERNEL = "RuntimeError: No available kernel. Aborting execution."


def no_flash(**overrides) -> AttentionProbe:
    checks = [KernelCheck("FLASH_ATTENTION", "causal", error=NO_KERNEL),
              KernelCheck("FLASH_ATTENTION", "gqa causal", error=NO_KERNEL),
              KernelCheck("EFFICIENT_ATTENTION", "bool mask", True, True, 5e-3),
              KernelCheck("EFFICIENT_ATTENTION", "additive mask", True, True, 5e-3)]
    return probe(flash_available=False, flash_gqa_ok=False, checks=checks, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Findings on fabricated probes


def test_healthy_gpu_and_cpu_give_no_findings() -> None:
    assert attention_findings(probe(), planner_assumes_flash=True) == []
    assert attention_findings(None, planner_assumes_flash=True) == []  # CPU: the probe returns None


def test_no_flash_on_rocm_names_aotriton_and_the_fallback() -> None:
    [line] = attention_findings(no_flash(), planner_assumes_flash=True)
    assert "flash attention is not available on AMD Instinct MI250X (rocm 6.2.41133, gfx90a, bf16)" in line
    assert NO_KERNEL in line and "AOTriton" in line and "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL" in line
    # The efficient kernel works: the same memory as planned, no memory warning.
    assert "memory-efficient kernel (the same memory as planned, slower)" in line
    assert "larger than the memory plan" not in line


def test_no_flash_and_no_efficient_warns_about_memory() -> None:
    checks = [KernelCheck("FLASH_ATTENTION", "causal", error=NO_KERNEL),
              KernelCheck("FLASH_ATTENTION", "gqa causal", error=NO_KERNEL),
              KernelCheck("EFFICIENT_ATTENTION", "bool mask", error=NO_KERNEL),
              KernelCheck("EFFICIENT_ATTENTION", "additive mask", error=NO_KERNEL)]
    lines = attention_findings(probe(runtime="cuda 12.4", arch="sm_70", device_name="Tesla V100", checks=checks,
                                     flash_available=False, flash_gqa_ok=False, efficient_masked_ok=False),
                               planner_assumes_flash=True)
    assert len(lines) == 2
    assert "falls back to the math kernel" in lines[0] and "larger than the memory plan" in lines[0]
    assert "sm_80" in lines[0] and "AOTriton" not in lines[0]
    assert "padded batches" in lines[1] and "train.micro_batch_size" in lines[1]


def test_flash_without_gqa() -> None:
    checks = probe().checks
    checks[1] = KernelCheck("FLASH_ATTENTION", "gqa causal", error=NO_KERNEL)
    [line] = attention_findings(probe(flash_gqa_ok=False, checks=checks, q_heads=8, kv_heads=2),
                                planner_assumes_flash=True)
    assert "rejects GQA (8 query heads on 2 key/value heads, enable_gqa=True)" in line


def test_disabled_flag_is_named() -> None:
    [line] = attention_findings(probe(flash_enabled=False, flash_available=False, flash_gqa_ok=False),
                                planner_assumes_flash=True)
    assert "flash_sdp_enabled() is False" in line


def test_wrong_results_warn_even_when_the_plan_assumed_no_flash() -> None:
    checks = probe().checks
    checks[3] = KernelCheck("EFFICIENT_ATTENTION", "additive mask", True, False, 0.9,
                            error="result differs from the math kernel: max |diff| 0.9")
    bad = probe(efficient_masked_ok=False, checks=checks, max_abs_diff=0.9)
    for assumed in (True, False):
        [line] = attention_findings(bad, planner_assumes_flash=assumed)
        assert "EFFICIENT_ATTENTION gives wrong results" in line and "max |diff| 0.9" in line


def test_a_plan_without_flash_does_not_warn_about_memory() -> None:
    assert attention_findings(no_flash(), planner_assumes_flash=False) == []


def test_probe_that_could_not_run() -> None:
    broken = AttentionProbe(device_name="cpu", runtime="cpu", errors=["device properties: RuntimeError: boom"])
    [line] = attention_findings(broken, planner_assumes_flash=True)
    assert "could not run" in line and "boom" in line


def test_record_findings_group_ranks_and_round_trip_through_json() -> None:
    good, bad = probe().to_dict(), json.loads(json.dumps(no_flash().to_dict()))
    records = [{"rank": r, "attention": bad if r in (0, 1, 2, 5) else good} for r in range(8)]
    [finding] = record_findings(records, planner_assumes_flash=True)
    assert finding["level"] == "warn" and finding["check"] == "attention" and finding["ranks"] == [0, 1, 2, 5]
    assert finding["message"].startswith("rank(s) 0-2,5 of 8: flash attention is not available")
    from launcher.train.preflight import Finding

    assert Finding(**finding).line().startswith("WARN attention: rank(s) 0-2,5 of 8")
    assert record_findings([{"rank": 0, "attention": None}], planner_assumes_flash=True) == []


def test_planner_assumption() -> None:
    assert planner_assumes_flash("mi250x_gcd") and planner_assumes_flash("a100_64gb")
    assert planner_assumes_flash(None)  # no profile: a local GPU run expects flash too
    assert not planner_assumes_flash("cpu")


def test_probe_shape_follows_the_model() -> None:
    llama8b = {"hidden_size": 4096, "num_heads": 32, "num_kv_heads": 8}
    assert A.probe_shape(llama8b) == {"head_dim": 128, "q_heads": 8, "kv_heads": 2}
    tiny = {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 4}  # no GQA: the probe still checks GQA
    assert A.probe_shape(tiny) == {"head_dim": 16, "q_heads": 8, "kv_heads": 2}
    assert A.probe_shape(None) == {"head_dim": 128, "q_heads": 8, "kv_heads": 2}


def test_module_import_is_stdlib_only() -> None:
    import subprocess
    import sys

    code = ("import sys; import launcher.train.attention_probe; "
            "bad = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------------------------
# The comparison on this machine's CPU kernels


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("call", ["causal", "gqa causal", "bool mask", "additive mask"])
def test_cpu_comparison_math_and_flash_agree(dtype: str, call: str) -> None:
    torch = pytest.importorskip("torch")
    checks = A.compare_backends(torch.device("cpu"), ["MATH", "FLASH_ATTENTION"], call=call, dtype=dtype,
                                q_heads=8, kv_heads=2, head_dim=32, seq_len=64)
    for check in checks:
        assert check.ran and check.ok, check
        assert check.max_abs_diff is not None and check.max_abs_diff <= (1e-4 if dtype == "fp32" else 2e-2)
    if dtype == "fp32":
        assert checks[0].max_abs_diff == 0.0  # MATH in fp32 is the reference itself


def test_cpu_comparison_records_a_missing_kernel() -> None:
    torch = pytest.importorskip("torch")
    [check] = A.compare_backends(torch.device("cpu"), ["EFFICIENT_ATTENTION"], call="bool mask", dtype="fp32",
                                 head_dim=32, seq_len=64)
    if check.ran:
        pytest.skip("this torch has a CPU memory-efficient kernel")
    assert not check.ok and check.error.startswith("RuntimeError:")


def test_cpu_comparison_catches_a_wrong_kernel(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    real = A.sdpa_call

    def broken(inputs, *, causal, gqa, upcast=False):
        out = real(inputs, causal=causal, gqa=gqa, upcast=upcast)
        return out if upcast else out + 0.1  # the kernel under test is off by 0.1; the fp32 reference is not

    monkeypatch.setattr(A, "sdpa_call", broken)
    [check] = A.compare_backends(torch.device("cpu"), ["MATH"], call="causal", dtype="bf16", head_dim=32, seq_len=64)
    assert check.ran and not check.ok and "differs from the math kernel" in check.error
    assert check.max_abs_diff == pytest.approx(0.1, abs=2e-2)


def test_masks_mask() -> None:
    torch = pytest.importorskip("torch")
    plain = A.make_inputs("cpu", dtype="fp32", batch=2, seq_len=32, head_dim=16)
    masked = A.make_inputs("cpu", dtype="fp32", batch=2, seq_len=32, head_dim=16, mask="bool")
    additive = A.make_inputs("cpu", dtype="fp32", batch=2, seq_len=32, head_dim=16, mask="additive")
    a = A.sdpa_call(plain, causal=True, gqa=True)
    b = A.sdpa_call(masked, causal=True, gqa=False)
    c = A.sdpa_call(additive, causal=True, gqa=False)
    assert torch.allclose(a[0], b[0], atol=1e-6)  # sequence 0 is unpadded: the mask is the causal one
    assert not torch.allclose(a[1], b[1], atol=1e-3)  # sequence 1 is padded
    assert torch.allclose(b, c, atol=1e-6)


def test_run_probe_on_cpu_and_no_probe_on_cpu_devices() -> None:
    torch = pytest.importorskip("torch")
    assert A.probe_attention(torch.device("cpu")) is None
    result = A.run_probe(torch.device("cpu"), head_dim=32, q_heads=8, kv_heads=2, seq_len=64)
    assert result.device_name == "cpu" and result.dtype == "bf16" and len(result.checks) == 4
    assert result.flash_available and result.flash_gqa_ok  # torch's CPU flash kernel
    assert result.max_abs_diff is not None and result.max_abs_diff < 2e-2
    assert AttentionProbe.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_preflight_on_a_cuda_device_puts_the_probe_in_the_report(monkeypatch, tmp_path: Path) -> None:
    """run_preflight's hook, on a fabricated probe (this machine has no GPU: the device check cannot pass with one
    required, so none is)."""
    torch = pytest.importorskip("torch")
    from launcher.config.schema import ClusterConfig, ModelConfig
    from launcher.train import preflight as P

    seen = {}

    def fake_probe(device, model_cfg=None):
        seen["model"] = model_cfg
        return no_flash()

    monkeypatch.setattr(A, "probe_attention", fake_probe)
    cluster = ClusterConfig(name="lumi", partition="small-g", device="mi250x_gcd", backend="nccl")
    model = ModelConfig(hidden_size=64, num_heads=4)
    options = P.PreflightOptions(require_device=False, run_dir=tmp_path, print_table=False, timeout_s=None)
    report = P.run_preflight(cluster, model=model, rank=0, local_rank=0, world_size=1,
                             device=torch.device("cuda", 0), options=options)
    assert report.ok and seen["model"] is model
    assert A.probe_shape(model) == {"head_dim": 16, "q_heads": 8, "kv_heads": 2}  # the dataclass, by attribute
    [finding] = [f for f in report.findings if f.check == "attention"]
    assert finding.level == "warn" and "flash attention is not available" in finding.message
    saved = json.loads((tmp_path / "preflight.json").read_text())
    assert saved["records"][0]["attention"]["flash_available"] is False
    assert "WARN attention: rank(s) 0 of 1: flash attention" in report.format_table()


def test_preflight_on_cpu_runs_no_probe(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from launcher.train import preflight as P

    monkeypatch.setattr(A, "probe_attention", lambda *a, **k: pytest.fail("probed on CPU"))
    report = P.run_preflight(None, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"),
                             options=P.PreflightOptions(print_table=False, timeout_s=None))
    assert "attention" not in report.records[0] and not [f for f in report.findings if f.check == "attention"]


# ---------------------------------------------------------------------------------------------------------------
# The dry run's summary line


@pytest.mark.parametrize("overrides, expected", [
    (["+cluster=lumi", LUMI_ACCOUNT], "  attention   flash (assumed by the memory plan; the preflight checks it on "
                                      "the GPUs)"),
    (["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.container.image=/leonardo_work/x/l.sif"],
     "  attention   flash (assumed by the memory plan"),
    (["+cluster=local_slurm"], "  attention   eager/sdpa math (CPU: the memory plan counts the a*s^2 attention"),
])
def test_summary_names_the_planned_attention(overrides, expected) -> None:
    cfg = config(overrides)
    lines = cluster_summary(cfg, make_plan(cfg)).splitlines()
    assert any(line.startswith(expected) for line in lines), lines
    # Between the training rows and the run directory.
    keys = [line.split()[0] for line in lines]
    assert keys[-2:] == ["attention", "run"]


@pytest.mark.parametrize("cluster", sorted(p.stem for p in (REPO / "conf" / "cluster").glob("*.yaml")))
def test_summary_line_matches_what_the_memory_plan_counted(monkeypatch, cluster) -> None:
    """The line, the probe's assumption and the planner's flash_attention argument say the same for every profile."""
    import launcher.plan.fit as M

    account = {"lumi": [LUMI_ACCOUNT], "leonardo": [LEONARDO_ACCOUNT, "cluster.container.image=/x/l.sif"]}
    cfg = config([f"+cluster={cluster}", *account.get(cluster, [])])
    captured = {}
    real = M.plan_strategies

    def spy(*args, **kwargs):
        captured.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(M, "plan_strategies", spy)
    M.strategy_fits(cfg, 2)
    flash = captured["flash_attention"]
    assert planned_attention(cfg).startswith("flash" if flash else "eager")
    assert planner_assumes_flash(cfg.cluster.device) == flash
