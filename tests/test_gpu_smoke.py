"""scripts/gpu_smoke.sh and its verdict (scripts/gpu_smoke_compare.py).

The comparison is checked on fabricated run folders; the script itself runs in its dry mode (CPU, fp32, 2 gloo ranks,
ddp/zero3/fsdp for 2 steps against the CPU reference: about 45 s on 2 cores, marked slow). Its GPU mode needs a GPU;
here only its refusal to run without one is checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_smoke.sh"

_spec = importlib.util.spec_from_file_location("gpu_smoke_compare", REPO / "scripts" / "gpu_smoke_compare.py")
C = importlib.util.module_from_spec(_spec)
sys.modules["gpu_smoke_compare"] = C
_spec.loader.exec_module(C)

REFERENCE_LOSSES = [6.96533, 6.87505, 6.74852, 6.6203, 6.47231]


def fake_run(out: Path, name: str, losses, *, device: str = "cuda:0", code: int = 0, seconds: float = 12.0,
             log_extra: str = "") -> None:
    run = out / f"smoke-{name}"
    run.mkdir(parents=True, exist_ok=True)
    records = [{"step": i + 1, "loss": loss, "lr": 1e-3} for i, loss in enumerate(losses)]
    records.append({"step": len(losses), "eval_loss": 6.4, "eval_batches": 1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    (logs / f"smoke-{name}.log").write_text(
        f"train: run smoke-{name}: 2 rank(s) via torchrun, backend nccl, device {device}, strategy ddp, peft none\n"
        + log_extra)
    (logs / f"smoke-{name}.rc").write_text(f"{code}\n")
    (logs / f"smoke-{name}.time").write_text(f"{seconds}\n")


def test_every_strategy_within_tolerance_passes(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path, "reference", REFERENCE_LOSSES, device="cpu")
    fake_run(tmp_path, "ddp", [x * (1 + 1e-3) for x in REFERENCE_LOSSES])
    fake_run(tmp_path, "zero3", [x * (1 - 5e-3) for x in REFERENCE_LOSSES])
    code = C.main([str(tmp_path), "ddp", "zero3", "--steps", "5", "--rtol", "2e-2"])
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines()[-1] == "gpu_smoke: PASS (2 of 2 strategies)"
    assert out.splitlines()[0].split() == ["run", "device", "precision", "exit", "steps", "max", "rel", "diff",
                                           "time", "result", "why"]
    rows = {line.split()[0]: line for line in out.splitlines()[2:5]}
    assert "cpu" in rows["reference"] and "fp32" in rows["reference"] and "PASS" in rows["reference"]
    assert "cuda:0" in rows["ddp"] and "bf16" in rows["ddp"] and "1.00e-03 @" in rows["ddp"]
    assert "5.00e-03 @" in rows["zero3"] and "PASS" in rows["zero3"]


def test_each_kind_of_failure_is_named(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path, "reference", REFERENCE_LOSSES, device="cpu")
    fake_run(tmp_path, "ddp", REFERENCE_LOSSES[:2] + [6.9, 6.9, 6.9])  # stopped learning after step 2
    fake_run(tmp_path, "zero1", REFERENCE_LOSSES[:3])  # two steps missing
    fake_run(tmp_path, "zero2", REFERENCE_LOSSES, device="cpu")  # silently on the CPU
    fake_run(tmp_path, "zero3", REFERENCE_LOSSES[:1], code=1, log_extra="RuntimeError: NCCL error\n")
    fake_run(tmp_path, "fsdp", REFERENCE_LOSSES[:4] + [math.nan])
    names = ["ddp", "zero1", "zero2", "zero3", "fsdp"]
    code = C.main([str(tmp_path), *names, "--steps", "5", "--rtol", "2e-2"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[-1] == "gpu_smoke: FAIL (0 of 5 strategies passed; failed: ddp, zero1, zero2, zero3, fsdp)"
    rows = {line.split()[0]: line for line in out.splitlines()[2:8]}
    assert "loss 6.90000 vs reference 6.47231 at step 5" in rows["ddp"] and "FAIL" in rows["ddp"]
    assert "no loss at step(s) 4,5" in rows["zero1"]
    assert "ran on cpu, expected cuda" in rows["zero2"]
    assert "exit 1" in rows["zero3"] and "RuntimeError: NCCL error" in out  # the log's tail follows the table
    assert "loss not finite at step(s) 5" in rows["fsdp"]


def test_a_broken_reference_fails_everything(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path, "reference", REFERENCE_LOSSES, device="cuda:0")  # the GPU was not hidden
    fake_run(tmp_path, "ddp", REFERENCE_LOSSES)
    assert C.main([str(tmp_path), "ddp", "--steps", "5", "--rtol", "2e-2"]) == 1
    out = capsys.readouterr().out
    assert "ran on cuda:0, expected cpu" in out and "no usable reference" in out


def test_a_run_that_never_started(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path, "reference", REFERENCE_LOSSES, device="cpu")
    assert C.main([str(tmp_path), "fsdp", "--steps", "5", "--rtol", "2e-2"]) == 1
    assert "did not run" in capsys.readouterr().out


def test_attention_probe_summary_from_preflight_json(tmp_path: Path) -> None:
    fake_run(tmp_path, "ddp", REFERENCE_LOSSES)
    probe = {"device_name": "NVIDIA H200", "runtime": "cuda 12.8", "flash_available": True, "flash_gqa_ok": True,
             "efficient_masked_ok": False, "max_abs_diff": 3.9e-3}
    report = {"records": [{"rank": 0, "attention": probe}],
              "findings": [{"level": "warn", "check": "attention", "message": "rank(s) 0 of 1: the memory-efficient"}]}
    (tmp_path / "smoke-ddp" / "preflight.json").write_text(json.dumps(report))
    lines = C.attention_notes(tmp_path, ["ddp"])
    assert lines[0] == ("attention probe (ddp, rank 0, NVIDIA H200, cuda 12.8): flash ok, flash GQA ok, "
                        "memory-efficient masked NO, max |diff| from math 3.90e-03")
    assert lines[1] == "  WARN attention: rank(s) 0 of 1: the memory-efficient"


def test_device_from_the_log() -> None:
    assert C.run_device("x\ntrain: run smoke-ddp: 2 rank(s) via torchrun, backend gloo, device cpu, strategy ddp, "
                        "peft none\n") == "cpu"
    assert C.run_device("nothing") == "?"


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHON=sys.executable, GPU_SMOKE_OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    return env


def test_gpu_mode_refuses_without_a_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "torch sees no GPU here" in done.stdout and "--dry" in done.stdout
    assert f"torch {torch.__version__}" in done.stdout  # the versions come first


def test_bad_argument(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), "zero4"], cwd=REPO, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown argument 'zero4'" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_mode_passes_and_prints_the_table(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    start = time.perf_counter()
    done = subprocess.run(["bash", str(SCRIPT), "--dry"], cwd=REPO, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=540)
    elapsed = time.perf_counter() - start
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode} after {elapsed:.0f}s\n{out[-6000:]}\n{done.stderr[-3000:]}"
    assert out.startswith("== gpu_smoke: DRY (CPU, fp32)")
    assert "torch " in out and "deepspeed " in out and "transformers " in out
    table = out[out.index("== gpu_smoke: results"):].splitlines()
    assert table[1].split()[:3] == ["run", "device", "precision"]
    for name in ("reference", "ddp", "zero3", "fsdp"):
        [row] = [line for line in table if line.split()[:1] == [name]]
        assert row.split()[1:4] == ["cpu", "fp32", "0"] and " PASS " in row, row
    assert table[-1] == "gpu_smoke: PASS (3 of 3 strategies)"
    losses = C.read_losses(tmp_path / "out" / "smoke-zero3" / "metrics.jsonl")
    assert sorted(losses) == [1, 2]
    print(f"gpu_smoke --dry: {elapsed:.1f}s")
