"""Scaling report: the arithmetic against hand-computed values, and a report over a synthetic sweep directory.

Login-node tests: no torch (the fingerprint test hides it), matplotlib only for the PNG checks.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from launcher import rundir
from launcher.config.schema import LauncherConfig
from launcher.plan.flops import flops_per_token
from launcher.scaling import fingerprint as fpmod
from launcher.scaling import metrics as m
from launcher.scaling.__main__ import main as cli_main
from launcher.scaling.logs import failure_reason, latest_logs
from launcher.scaling.report import write_report
from launcher.scaling.sweep import collect_points, infer_mode
from tests.login_helpers import LEONARDO_ACCOUNT, LUMI_ACCOUNT, REPO, config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------------------
def test_flops_per_token_is_6n_plus_12lhs():
    # N = 1e9, L = 16, H = 2048, S = 4096: 6e9 + 12 * 16 * 2048 * 4096 = 6e9 + 1,610,612,736
    full = dict(matmul_params=10**9, n_layers=16, hidden_size=2048, seq_len=4096)
    assert flops_per_token(trainable_matmul_params=10**9, **full) == 7_610_612_736
    # LoRA with 1e7 adapter parameters inside N: 4N + 2 x 1e7 + attention
    assert flops_per_token(trainable_matmul_params=10**7, **full) == 4e9 + 2e7 + 1_610_612_736


def test_mfu_hand_computed():
    # A100: 1000 tokens/s x 6.24e11 FLOP/token on 4 devices of 312 TFLOP/s = 6.24e14 / 1.248e15 = 0.5
    assert m.mfu(1000, 6.24e11, 4, 312) == pytest.approx(0.5)
    # LUMI: 8 GCDs x 5,800 tokens/s = 46,400 tokens/s at 7.610612736e9 FLOP/token against 8 x 191.5 TFLOP/s:
    # 3.531324309504e14 / 1.532e15 = 0.230504
    assert m.mfu(46_400, 7_610_612_736, 8, 191.5) == pytest.approx(0.230504, rel=1e-5)
    with pytest.raises(ValueError):
        m.mfu(1000, 1e9, 0, 312)


def test_strong_scaling_efficiency():
    # (T_n / T_1) / (D_n / D_1): 1; (72k / 40k) / 2 = 0.9; (128k / 40k) / 4 = 0.8. Order kept, reference = fewest.
    effs = m.scaling_efficiency([(16, 72_000), (8, 40_000), (32, 128_000)], "strong")
    assert effs == pytest.approx([0.9, 1.0, 0.8])


def test_weak_scaling_efficiency():
    # (T_n / D_n) / (T_1 / D_1) = (19,000 / 8) / (10,000 / 4) = 2375 / 2500 = 0.95
    assert m.scaling_efficiency([(4, 10_000), (8, 19_000)], "weak") == pytest.approx([1.0, 0.95])
    # With throughput as the measure both modes give the per-device throughput ratio.
    pts = [(4, 10_000), (8, 19_000), (16, 30_000)]
    assert m.scaling_efficiency(pts, "weak") == pytest.approx(m.scaling_efficiency(pts, "strong"))
    with pytest.raises(ValueError):
        m.scaling_efficiency(pts, "sideways")


def test_node_hours_per_billion_tokens():
    # 2 nodes at 100,000 tokens/s: 1e9 / 1e5 = 10,000 s = 2.7778 h, x 2 nodes = 5.5556 node-hours
    assert m.node_hours_per_billion_tokens(100_000, 2) == pytest.approx(5.555556, rel=1e-6)


def test_lumi_billing_matches_the_launchers_cost():
    from launcher.plan.job import billing_units

    cluster = config(["+cluster=lumi", LUMI_ACCOUNT]).cluster
    assert m.billing_rate_per_node_hour(cluster) == 4.0  # standard-g: 4 GPU-hours per node-hour
    # 2 nodes at 100k tokens/s: 5.5556 node-hours x 4 = 22.222 GPU-hours per billion tokens
    assert m.billing_units_per_billion_tokens(100_000, 2, 4.0) == pytest.approx(22.22222, rel=1e-6)
    small = replace(cluster, partition="small-g")
    # gpu_hours rule: max(8 GCDs, ceil(8 x 7 cores / 8) = 7) / 2 GCDs per billed GPU = 4 per node-hour
    assert m.billing_rate_per_node_hour(small) == 4.0
    # a shared (non-exclusive) job of 2 GCDs and 14 cores: max(2, 2) / 2 = 1
    shared = replace(small, gpus_per_node_requested=2, tasks_per_node=2, exclusive=False)
    assert m.billing_rate_per_node_hour(shared) == 1.0
    for c in (cluster, small, shared):
        assert m.billing_rate_per_node_hour(c) * 3 * 2 == pytest.approx(billing_units(c, 3, 7200))


def test_leonardo_billing_is_node_hours():
    from launcher.plan.job import billing_units

    cluster = config(["+cluster=leonardo", LEONARDO_ACCOUNT]).cluster
    assert cluster.billing_unit == "node_hours"
    assert m.billing_rate_per_node_hour(cluster) == 1.0
    per_btok = m.node_hours_per_billion_tokens(50_000, 4)
    assert m.billing_units_per_billion_tokens(50_000, 4, 1.0) == pytest.approx(per_btok)
    assert billing_units(cluster, 4, 3600) == pytest.approx(4 * m.billing_rate_per_node_hour(cluster))
    assert m.billing_rate_per_node_hour(None) is None


def test_projection():
    # 2e11 tokens at 1e5 tokens/s = 2e6 s = 555.56 h; x 2 nodes = 1111.1 node-hours; x 4 = 4444.4 GPU-hours (LUMI)
    proj = m.project(2e11, {"tokens_per_s": 1e5, "nodes": 2, "billing_per_node_hour": 4.0})
    assert proj["wall_hours"] == pytest.approx(555.5556, rel=1e-6)
    assert proj["node_hours"] == pytest.approx(1111.111, rel=1e-6)
    assert proj["billing_units"] == pytest.approx(4444.444, rel=1e-6)
    # +10 % overhead; no rate (a local run): no billing
    proj = m.project(2e11, {"tokens_per_s": 1e5, "nodes": 2}, overhead=0.1)
    assert proj["node_hours"] == pytest.approx(1222.222, rel=1e-6)
    assert proj["billing_units"] is None
    with pytest.raises(ValueError):
        m.project(1e9, {"tokens_per_s": None, "nodes": 1})


def test_throughput_stats_excludes_warmup_and_eval_lines():
    records = [{"step": s, "tokens_per_s": 100.0, "peak_mem_gb": 1.0 + s / 10} for s in (1, 2, 3)]  # warm-up
    records += [{"step": s, "tokens_per_s": t, "tokens_per_s_per_device": t / 4, "peak_mem_gb": 1.2}
                for s, t in zip(range(4, 9), (1000.0, 900.0, 1100.0, 1000.0, 800.0))]
    records.append({"step": 8, "eval_loss": 2.5, "eval_batches": 4})
    stats = m.throughput_stats(records, 3, tokens_per_step=1000)
    assert stats["measured_steps"] == 5 and stats["logged_steps"] == 8 and stats["last_step"] == 8
    assert stats["tokens_per_s"] == 1000.0  # median of 800, 900, 1000, 1000, 1100
    assert stats["tokens_per_s_per_device"] == 250.0
    assert stats["peak_mem_gb"] == pytest.approx(1.3)  # the warm-up max counts: the peak is a running maximum
    # step times 1000 / T: 1.0, 1.111, 0.909, 1.0, 1.25 -> median 1.0; p10 = 0.909 + 0.4 x (1.0 - 0.909) = 0.9455
    assert stats["step_time_s"] == pytest.approx(1.0)
    assert stats["step_time_p10_s"] == pytest.approx(0.909091 + 0.4 * (1.0 - 0.909091), rel=1e-5)
    assert stats["spread"] == pytest.approx((stats["step_time_p90_s"] - stats["step_time_p10_s"]) / 1.0)
    assert stats["mfu"] is None
    # Without tokens_per_step, the cumulative `tokens` field gives it; a logged step_time_s wins.
    recs = [{"step": s, "tokens_per_s": 500.0, "tokens": 1000 * s} for s in range(1, 6)]
    recs[-1]["step_time_s"] = 3.0
    # measured steps 2..5: 1000 / 500 = 2 s three times, then 3 s; p90 at rank 0.9 x 3 = 2.7 -> 2 + 0.7 x 1 = 2.7
    assert m.throughput_stats(recs, 1)["step_time_p90_s"] == pytest.approx(2.7)
    assert m.throughput_stats(recs, 10)["tokens_per_s"] is None


# ---------------------------------------------------------------------------------------------------------------------
# A synthetic sweep: 1, 2, 4 nodes ok, 8 nodes out of memory (LUMI, llama-1b, zero3, strong scaling)
# ---------------------------------------------------------------------------------------------------------------------
GLOBAL_BATCH_SEQ = 64  # sequences per step at every point: micro 1 x accum (8 / nodes) x 8 nodes-worth of GCDs
SEQ = 2048
PER_GCD = {1: 5000.0, 2: 4800.0, 4: 4500.0}
FINGERPRINT = {
    "git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
    "container_image": "/appl/local/containers/sif-images/lumi-pytorch-rocm-6.2.4-python-3.12-pytorch-v2.7.1.sif",
    "container_digest": "sha256-head64MiB:" + "ab" * 32 + ":9876543210", "torch": "2.7.1+rocm6.2.4",
    "hip": "6.2.41134", "cuda": None, "nccl": "2.20.5", "deepspeed": "0.17.5", "transformers": "4.56.2",
    "python": "3.12.8",
}
OOM_LOG = """\
train: step 5/30 loss 9.1 lr 1.0e-04 grad_norm 3.1 tokens/s 120000 mem 63.1GB elapsed 40s
Traceback (most recent call last):
  File "/project/launcher/train/main.py", line 180, in run
    outcome = loop.run()
  File "/project/launcher/train/loop.py", line 110, in run
    loss = self.strategy.step(batch)
torch.OutOfMemoryError: HIP out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of 63.98 GiB
srun: error: nid005001: task 0: Exited with exit code 1
"""


@pytest.fixture(scope="module")
def lumi_cfg():
    return config(["+cluster=lumi", LUMI_ACCOUNT, "model=llama-1b", "strategy=zero3", "train.max_steps=30",
                   "train.micro_batch_size=1", f"train.seq_len={SEQ}"])


def _write_point(sweep: Path, cfg: LauncherConfig, nodes: int, records: list, *, export: bool,
                 log: str | None = None, jobid: int = 1000) -> Path:
    run = sweep / f"bench__nodes={nodes},strategy=zero3"
    (run / "slurm").mkdir(parents=True)
    train = replace(cfg.train, grad_accum=GLOBAL_BATCH_SEQ // (8 * nodes) or 1)
    rundir.write_config(run, replace(cfg, nodes=nodes, run_name=run.name, train=train))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "environment.json").write_text(json.dumps(dict(FINGERPRINT, job_id=str(jobid), world_size=8 * nodes,
                                                          nodelist=f"nid[005000-{5000 + nodes - 1:06d}]")))
    (run / "slurm" / f"{jobid}_0_log.out").write_text(log or "train: done\n")
    (run / "slurm" / f"{jobid}_0_log.err").write_text("")
    if export:
        (run / "export").mkdir()
    return run


def _records(nodes: int, per_gcd: float, steps: int) -> list:
    devices = 8 * nodes
    out = []
    for step in range(1, steps + 1):
        jitter = 1.0 + 0.01 * ((step % 3) - 1)
        t = per_gcd * devices * (0.3 if step <= 2 else jitter)
        out.append({"step": step, "loss": 9.0, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": t,
                    "tokens_per_s_per_device": t / devices, "peak_mem_gb": 40.0 + nodes,
                    "tokens": step * GLOBAL_BATCH_SEQ * SEQ, "elapsed_s": step * 2.0})
        if step % 10 == 0:
            out.append({"step": step, "eval_loss": 8.9, "eval_batches": 4})
    return out


@pytest.fixture()
def sweep(tmp_path, lumi_cfg):
    sweep = tmp_path / "runs"
    for nodes, per_gcd in PER_GCD.items():
        _write_point(sweep, lumi_cfg, nodes, _records(nodes, per_gcd, 30), export=True, jobid=1000 + nodes)
    _write_point(sweep, lumi_cfg, 8, _records(8, 4000.0, 5), export=False, log=OOM_LOG, jobid=1008)
    return sweep


def test_collect_points(sweep):
    points = collect_points(sweep, warmup_steps=5)
    assert [(p.nodes, p.devices, p.status) for p in points] == [(1, 8, "ok"), (2, 16, "ok"), (4, 32, "ok"),
                                                                (8, 64, "failed")]
    one, two, four, failed = points
    assert one.tokens_per_s == pytest.approx(40_000) and one.per_device == pytest.approx(5000)
    assert [p.efficiency for p in (one, two, four)] == pytest.approx([1.0, 0.96, 0.9])
    # MFU computed (no mfu logged): 6N + 12LHS with N = llama-1b without its (tied, so counted) embedding
    assert one.mfu_source == "computed"
    assert one.mfu == pytest.approx(m.mfu(40_000, one.flops_per_token, 8, 191.5))
    assert one.flops_per_token == pytest.approx(6 * one.n_params + 12 * 16 * 2048 * SEQ)
    assert one.n_params == pytest.approx(1.236e9, rel=1e-3)
    assert one.node_hours_per_btok == pytest.approx(1e9 / 40_000 / 3600)
    assert four.billing_per_btok == pytest.approx(4 * 1e9 / 144_000 / 3600 * 4)
    assert one.global_batch_tokens == four.global_batch_tokens == GLOBAL_BATCH_SEQ * SEQ
    assert infer_mode(points) == "strong"
    assert failed.reason.startswith("out of memory: torch.OutOfMemoryError: HIP out of memory")
    assert failed.tokens_per_s is None and failed.efficiency is None
    assert failed.peak_mem_gb == 48.0  # what it reached before dying is kept


def test_report_files(sweep, tmp_path):
    out = tmp_path / "report"
    result = write_report(sweep, out, mode="auto", warmup_steps=5, tokens_target=2e11)
    assert result["mode"] == "strong"
    with open(out / "scaling.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["nodes"] for r in rows] == ["1", "2", "4", "8"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert float(rows[0]["tokens_per_s"]) == pytest.approx(40_000)
    assert float(rows[1]["efficiency"]) == pytest.approx(0.96)
    assert float(rows[2]["billing_per_btok"]) == pytest.approx(4 * 1e9 / 144_000 / 3600 * 4)
    # 2e11 tokens at 40,000 tokens/s on 1 node: 1388.9 node-hours, 5555.6 GPU-hours
    assert float(rows[0]["proj_node_hours"]) == pytest.approx(2e11 / 40_000 / 3600)
    assert float(rows[0]["proj_billing_units"]) == pytest.approx(4 * 2e11 / 40_000 / 3600)
    assert "HIP out of memory" in rows[3]["reason"] and rows[3]["tokens_per_s"] == ""
    assert rows[0]["git_commit"] == FINGERPRINT["git_commit"] and rows[3]["job_id"] == "1008"

    md = (out / "scaling.md").read_text()
    assert md == result["markdown"]
    table = [line for line in md.splitlines() if line.startswith("| zero3 |")]
    assert len(table) == 4 + 3  # 4 rows in the table, 3 measured rows in the projection
    assert "**failed** (bench__nodes=8,strategy=zero3): out of memory: torch.OutOfMemoryError: HIP out of memory" in table[3]
    assert "| zero3 | 1 | 8 | 40,000 | 5,000 |" in table[0] and "100 %" in table[0] and "96 %" in table[1]
    assert "GPU-hours / 1B tok" in md and "Strong scaling" in md and "llama-1b" in md
    assert "commit 0123456789" in md and "RCCL 2.20.5" in md and "191.5 TFLOP/s" in md
    assert "Projection** for 200 billion training tokens" in md

    for name in ("throughput.png", "efficiency.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5_000
        import matplotlib.image

        image = matplotlib.image.imread(str(path))
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


def test_cli_prints_table_and_paths(sweep, capsys):
    assert cli_main(["report", str(sweep), "--warmup-steps", "5", "--mode", "weak"]) == 0
    printed = capsys.readouterr().out
    assert "| Strategy | Nodes | Devices |" in printed and "**failed**" in printed
    assert str(sweep / "scaling" / "scaling.md") in printed and "3 of 4 points measured, 1 failed" in printed
    # weak mode on a fixed-global-batch sweep: said, not hidden
    assert "weak scaling asks for a fixed per-device batch" in (sweep / "scaling" / "scaling.md").read_text()
    assert cli_main(["report", str(sweep / "missing")]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Failure reasons
# ---------------------------------------------------------------------------------------------------------------------
def _run_with_log(tmp_path: Path, out: str, err: str = "") -> Path:
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "77_0_log.out").write_text(out)
    (run / "slurm" / "77_0_log.err").write_text(err)
    return run


def test_failure_reasons(tmp_path):
    run = _run_with_log(tmp_path, "step 3\n", "slurmstepd: error: *** JOB 77 ON nid1 CANCELLED AT 2025-01-01T00:00:00 "
                                              "DUE TO TIME LIMIT ***\n")
    assert failure_reason(run).startswith("time limit: slurmstepd")
    run = _run_with_log(tmp_path / "b", "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                        "    boom()\nValueError: data.path does not exist\nsrun: error: task 0\n")
    assert failure_reason(run) == "ValueError: data.path does not exist"
    run = _run_with_log(tmp_path / "c", "nid1:1:1 [0] NCCL WARN Call to connect returned Connection refused\n")
    assert failure_reason(run).startswith("NCCL error:")
    run = _run_with_log(tmp_path / "d", "all good so far\n")
    assert failure_reason(run) is None
    # rank 0's per-attempt logs (launcher.slurm.task): the newest attempt speaks
    (run / "logs").mkdir()
    (run / "logs" / "attempt-1.log").write_text("RuntimeError: CUDA out of memory\n")
    (run / "logs" / "attempt-2.log").write_text("Traceback (most recent call last):\n  File \"x\"\nKeyError: 'x'\n")
    assert failure_reason(run) == "KeyError: 'x'"


def test_the_newest_job_is_newest_by_id_not_by_file_time(tmp_path):
    run = tmp_path / "run"
    slurm = run / rundir.SLURM_DIR
    slurm.mkdir(parents=True)
    logs = {"99_0_log.out": "RuntimeError: CUDA out of memory\n",  # an older job
            "100_9_0_log.out": "RuntimeError: CUDA out of memory\n",  # array task 100_9
            "100_10_1_log.out": "step 3\n",  # 100_10 is newer than 100_9 (not in string order)
            "100_10_0_log.err": "slurmstepd: error: *** JOB 100_10 ON nid1 CANCELLED AT 2025 DUE TO TIME LIMIT ***\n",
            "100_10_0_log.out": "step 2\n"}
    for name, text in logs.items():
        (slurm / name).write_text(text)
    later = (slurm / "100_10_0_log.out").stat().st_mtime + 100
    os.utime(slurm / "99_0_log.out", (later, later))  # the older job's log written last: still the older job
    assert [p.name for p in latest_logs(run)] == ["100_10_0_log.out", "100_10_0_log.err", "100_10_1_log.out"]
    assert failure_reason(run).startswith("time limit: slurmstepd")


def test_missing_metrics_is_a_failed_point(tmp_path, lumi_cfg):
    run = tmp_path / "runs" / "p"
    rundir.write_config(run, replace(lumi_cfg, nodes=2, run_name="p"))
    (point,) = collect_points(tmp_path / "runs")
    assert point.status == "failed" and point.reason.startswith("no metrics") and point.devices == 16
    result = write_report(tmp_path / "runs", tmp_path / "out")  # no ok point: still a report with valid plots
    assert "**failed** (p): no metrics" in result["markdown"]
    assert (tmp_path / "out" / "throughput.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_metrics_line_cut_by_a_crash_is_skipped(sweep):
    before = {p.name: p.tokens_per_s for p in collect_points(sweep, warmup_steps=5)}
    run = sweep / "bench__nodes=1,strategy=zero3"
    with open(run / rundir.METRICS_FILE, "a") as handle:
        handle.write('{"step": 31, "loss": 9.0, "tokens_per_s": 4')  # the last line, cut mid-write
    points = {p.name: p for p in collect_points(sweep, warmup_steps=5)}
    assert points[run.name].status == "ok" and points[run.name].last_step == 30
    assert {name: p.tokens_per_s for name, p in points.items()} == before


def test_one_unreadable_point_does_not_stop_the_report(sweep, tmp_path):
    yaml_broken = sweep / "bench__nodes=2,strategy=zero3"
    (yaml_broken / rundir.CONFIG_FILE).write_text("nodes: 2\ntrain: [micro_batch_size: 1\n")  # not YAML
    wrong_type = sweep / "bench__nodes=4,strategy=zero3"
    text = (wrong_type / rundir.CONFIG_FILE).read_text()
    (wrong_type / rundir.CONFIG_FILE).write_text(text.replace("max_steps: 30", "max_steps: thirty"))
    metrics_dir = sweep / "bench__nodes=8,strategy=zero3"
    (metrics_dir / rundir.METRICS_FILE).unlink()
    (metrics_dir / rundir.METRICS_FILE).mkdir()  # exists, cannot be read as a file

    result = write_report(sweep, tmp_path / "out", warmup_steps=5)
    by_name = {p.name: p for p in result["points"]}
    assert by_name["bench__nodes=1,strategy=zero3"].ok and by_name["bench__nodes=1,strategy=zero3"].efficiency == 1.0
    broken = by_name[yaml_broken.name]
    assert broken.status == "failed"
    assert broken.reason == ("config.yaml unreadable: ParserError at line 3, column 1: "
                             "expected ',' or ']', but got '<stream end>'")
    wrong = by_name[wrong_type.name]
    assert wrong.status == "failed" and wrong.reason.startswith("config.yaml unreadable: does not fit the schema")
    assert "train.max_steps" in wrong.reason
    unreadable = by_name[metrics_dir.name]
    assert unreadable.reason == "metrics.jsonl unreadable: a directory, not a regular file"
    assert unreadable.devices == 64  # what the config says is kept
    assert f"**failed** ({yaml_broken.name}): config.yaml unreadable" in result["markdown"]
    assert [r["status"] for r in csv.DictReader((tmp_path / "out" / "scaling.csv").open())].count("ok") == 1


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprint and login-node hygiene
# ---------------------------------------------------------------------------------------------------------------------
def test_fingerprint_without_torch(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(fpmod, "git_info", lambda: {"git_commit": commit, "git_dirty": False, "code_dir": "/code"})
    image = tmp_path / "image.sif"
    image.write_bytes(b"SIF" * 1000)
    monkeypatch.setenv("APPTAINER_CONTAINER", str(image))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "nid[005000-005001]")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "hsn0")
    monkeypatch.delenv("LAUNCHER_CONTAINER_DIGEST", raising=False)
    for name in ("torch", "deepspeed", "transformers", "peft", "accelerate"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails: recorded, not raised
    path = fpmod.write_fingerprint(tmp_path, world_size=16)
    fp = json.loads(path.read_text())
    assert fp["job_id"] == "4242" and fp["nodelist"] == "nid[005000-005001]" and fp["world_size"] == 16
    assert fp["container_image"] == str(image) and fp["container_digest"].endswith(":3000")
    assert fp["container_digest"] == fpmod.container_digest(str(image))
    assert fp["torch"] is None and "torch" in fp["errors"] and fp["env"]["NCCL_SOCKET_IFNAME"] == "hsn0"
    assert fp["git_commit"] == commit and fp["git_dirty"] is False
    assert not list(tmp_path.glob("*.tmp"))


def test_git_info_outside_a_repository(tmp_path):
    assert fpmod.git_info(tmp_path) == {"git_commit": None, "git_dirty": None, "code_dir": str(tmp_path)}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_info_of_a_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        identity = ["-c", "user.name=test", "-c", "user.email=test@example.org", "-c", "commit.gpgsign=false"]
        return subprocess.run(["git", "-C", str(repo), *identity, *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    (repo / "file.txt").write_text("one\n")
    git("add", "file.txt")
    git("commit", "-q", "-m", "one")
    info = fpmod.git_info(repo)
    assert info["git_commit"] == git("rev-parse", "HEAD") and len(info["git_commit"]) == 40
    assert info["git_dirty"] is False
    (repo / "file.txt").write_text("two\n")
    assert fpmod.git_info(repo)["git_dirty"] is True


def test_report_imports_neither_torch_nor_matplotlib():
    code = ("import sys, launcher.scaling, launcher.scaling.report, launcher.scaling.__main__, "
            "launcher.scaling.fingerprint; bad = [m for m in ('torch', 'matplotlib', 'deepspeed') if m in sys.modules];"
            " sys.exit(str(bad) if bad else 0)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
