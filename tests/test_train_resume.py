"""Stop and resume: SIGTERM mid-run, checkpoint, exit code 3, same command again -> the uninterrupted run's losses.

The reference is the uninterrupted 8-step run of ``full_runs`` (same config; ``train.save_every`` and
``train.debug_step_sleep_s`` are bookkeeping and do not change the model). On CPU the resumed losses must be
bit-identical (tolerance 0).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from conftest import REPO, TrainLauncher, check_ok, copy_run, losses, records

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")]

STOP_OVERRIDES = ["train.save_every=2", "train.debug_step_sleep_s=0.3"]
STOP_AT = 3  # SIGTERM once the metrics show this step


def _wait_for_step(run_dir: Path, procs: List[subprocess.Popen], step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            out = "\n".join(p.communicate()[0][-3000:] for p in procs)
            raise AssertionError(f"training ended before step {step}:\n{out}")
        if metrics.exists():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def stop_torchrun(launcher: TrainLauncher, run_dir: Path) -> str:
    """Start torchrun in its own process group, SIGTERM the whole group mid-run (as Ctrl-C or a scheduler would)."""
    proc = subprocess.Popen(launcher.torchrun_command(run_dir), env=launcher.env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_step(run_dir, [proc], STOP_AT)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_tasks(launcher: TrainLauncher, run_dir: Path, port: int) -> List[subprocess.Popen]:
    """Two tasks as srun starts them: SLURM_* variables, no RANK/WORLD_SIZE, no MASTER_ADDR (from the node list)."""
    procs = []
    for rank in range(2):
        env = launcher.env({
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port),
        })
        env.pop("MASTER_ADDR", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "launcher.train", str(run_dir)], env=env, cwd=REPO,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def stop_slurm(launcher: TrainLauncher, run_dir: Path) -> Tuple[List[int], str]:
    procs = slurm_tasks(launcher, run_dir, _free_port())
    _wait_for_step(run_dir, procs, STOP_AT)
    os.kill(procs[1].pid, signal.SIGTERM)  # one rank is enough: the ranks agree at the step boundary
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(outs)


def checkpoints(run_dir: Path) -> Dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()}


def assert_one_history(run_dir: Path) -> None:
    recs = records(run_dir)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in recs if "eval_loss" in r] == [4, 8]


def corrupt(newest: Path, how: str) -> None:
    if how == "truncate":  # a shard cut short (a node died while the file system flushed)
        files = [p for p in newest.rglob("*") if p.is_file() and p.name != "COMPLETE"]
        shard = max(files, key=lambda p: p.stat().st_size)
        with open(shard, "r+b") as handle:
            handle.truncate(shard.stat().st_size // 2)
    elif how == "half-deleted":  # someone (or a purge) removed part of it
        for shard in sorted(newest.rglob("*optim_states.pt"))[:1] or sorted(newest.rglob("*.distcp"))[:1]:
            shard.unlink()
    else:
        raise ValueError(how)


@pytest.mark.parametrize(
    "strategy,launch,damage",
    [("ddp", "torchrun", None), ("zero2", "slurm", None), ("zero3", "torchrun", "half-deleted"),
     ("fsdp", "torchrun", "truncate")],
)
def test_sigterm_then_rerun_matches_the_uninterrupted_run(
    full_runs: Dict[str, Path], train_launcher: TrainLauncher, strategy: str, launch: str, damage: str
) -> None:
    run_dir = train_launcher.make_run(f"stop-{strategy}", [f"strategy={strategy}", *STOP_OVERRIDES])
    if launch == "slurm":
        codes, out = stop_slurm(train_launcher, run_dir)
        assert codes == [3, 3], out[-4000:]
    else:
        out = stop_torchrun(train_launcher, run_dir)
    assert "after a checkpoint: exit 3" in out, out[-4000:]
    saved = checkpoints(run_dir)
    stopped_at = max(saved)
    assert STOP_AT <= stopped_at < 8 and len(saved) >= 2, (saved, out[-3000:])
    assert max(r["step"] for r in records(run_dir)) == stopped_at
    assert not (run_dir / "export").exists()

    resume_from = stopped_at
    if damage:
        corrupt(saved[stopped_at], damage)
        resume_from = max(s for s in saved if s < stopped_at)

    if launch == "slurm":
        procs = slurm_tasks(train_launcher, run_dir, _free_port())
        outs = [p.communicate(timeout=300)[0] for p in procs]
        out = "\n".join(outs)
        assert [p.returncode for p in procs] == [0, 0], out[-4000:]
    else:
        result = train_launcher.torchrun(run_dir)
        check_ok(result)
        out = result.stdout + result.stderr
    assert f"resumed from {saved[resume_from]} (step {resume_from})" in out, out[-3000:]
    if damage:
        assert f"WARNING: skipping checkpoint {saved[stopped_at]}" in out, out[-3000:]

    reference = losses(full_runs[strategy])
    resumed = losses(run_dir)
    assert resumed == reference, {s: (resumed.get(s), reference[s]) for s in reference}  # bit-identical on CPU
    assert_one_history(run_dir)
    assert (run_dir / "export" / "config.json").is_file()


def test_crash_during_a_save_leaves_the_previous_checkpoint(
    full_runs: Dict[str, Path], train_launcher: TrainLauncher
) -> None:
    """Rank 1 dies right after writing its shard of step 4: step-4 never becomes a checkpoint; resume uses step 2."""
    run_dir = train_launcher.make_run("crash-in-save", ["strategy=ddp", "train.save_every=2"])
    crashed = train_launcher.spawn(run_dir, env={"LAUNCHER_FAULT_KILL_IN_SAVE": "4:1"})
    assert crashed.returncode != 0
    assert (run_dir / "checkpoints" / "step-4.tmp").is_dir()
    assert not (run_dir / "checkpoints" / "step-4").exists()
    result = train_launcher.spawn(run_dir)
    check_ok(result)
    out = result.stdout + result.stderr
    assert "step-4.tmp (a crash during a save)" in out and "(step 2)" in out, out[-3000:]
    assert not (run_dir / "checkpoints" / "step-4.tmp").exists()
    assert losses(run_dir) == losses(full_runs["ddp"])
    assert_one_history(run_dir)


def test_fsdp_resumes_on_another_world_size(full_runs: Dict[str, Path], tmp_path: Path,
                                            train_launcher: TrainLauncher) -> None:
    """DCP reshards: a 2-rank fsdp checkpoint continues on 1 rank (2 more steps)."""
    run_dir = copy_run(full_runs["fsdp"], tmp_path / "fsdp-1rank", {"train.max_steps": 10, "train.eval_every": 0})
    result = train_launcher.single(run_dir)
    check_ok(result)
    assert "written by 2 ranks" in result.stdout and "(step 8)" in result.stdout, result.stdout[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, 11))


def test_export_only_exports_the_newest_checkpoint(full_runs: Dict[str, Path], tmp_path: Path,
                                                   train_launcher: TrainLauncher) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = copy_run(full_runs["zero3"], tmp_path / "zero3-export", {"export_only": True})
    shutil.rmtree(run_dir / "export")
    result = train_launcher.spawn(run_dir)
    check_ok(result)
    ids = torch.arange(1, 17).unsqueeze(0)
    again = AutoModelForCausalLM.from_pretrained(run_dir / "export")(input_ids=ids).logits
    original = AutoModelForCausalLM.from_pretrained(full_runs["zero3"] / "export")(input_ids=ids).logits
    assert torch.equal(again, original)
    assert losses(run_dir) == losses(full_runs["zero3"])  # no training happened
