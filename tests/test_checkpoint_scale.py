"""Checkpoints at scale (issue 15 B): adapter-only LoRA checkpoints, background saves, ZeRO on another world size.

Unit tests (no process group) for the base fingerprint and the background-save protocol; end-to-end tests train the
tiny models of conftest on 2 CPU ranks (torchrun) or 1 (``python -m launcher.train``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import REPO, TrainLauncher, check_ok, copy_run, losses, records

torch = pytest.importorskip("torch")

from launcher.config.strategies import strategy_spec  # noqa: E402
from launcher.train import distributed as D  # noqa: E402
from launcher.train.checkpoint import COMPLETE, CheckpointManager  # noqa: E402
from launcher.train.frozen_base import base_fingerprint, fingerprint_notes, fingerprint_problem  # noqa: E402

# A model of a few million parameters (3.7M): LoRA's share of it is what a 7B-70B run sees, not the tiny model's.
SMALL_MODEL = ["model.hidden_size=256", "model.intermediate_size=688", "model.num_layers=4", "model.num_heads=4",
               "model.num_kv_heads=4"]


# ------------------------------------------------------------------------------------------------- fingerprint


def _save_base(directory: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(directory)


def test_a_changed_pretrained_base_is_refused_and_a_moved_one_noted(tmp_path: Path) -> None:
    from launcher.config.schema import ModelConfig

    _save_base(tmp_path / "base", seed=1)
    saved = base_fingerprint(ModelConfig(pretrained=str(tmp_path / "base")), seed=0)
    assert list(saved["files"]) == ["model.safetensors"] and saved["source"] == "pretrained"
    assert fingerprint_problem(saved, base_fingerprint(ModelConfig(pretrained=str(tmp_path / "base")), seed=7)) is None

    shutil.copytree(tmp_path / "base", tmp_path / "moved")
    moved = base_fingerprint(ModelConfig(pretrained=str(tmp_path / "moved")), seed=0)
    assert fingerprint_problem(saved, moved) is None
    assert "moved from" in fingerprint_notes(saved, moved)[0]

    _save_base(tmp_path / "base", seed=2)  # same architecture and size, other weights
    problem = fingerprint_problem(saved, base_fingerprint(ModelConfig(pretrained=str(tmp_path / "base")), seed=0))
    assert problem is not None and "model.safetensors" in problem


def test_a_base_built_from_the_config_is_its_numbers_and_seed() -> None:
    from launcher.config.schema import ModelConfig

    saved = base_fingerprint(ModelConfig(), seed=1234)
    assert fingerprint_problem(saved, base_fingerprint(ModelConfig(gradient_checkpointing=True), seed=1234)) is None
    assert "train.seed (1234 -> 1)" in fingerprint_problem(saved, base_fingerprint(ModelConfig(), seed=1))
    assert "model.hidden_size" in fingerprint_problem(saved, base_fingerprint(ModelConfig(hidden_size=32), seed=1234))


# ------------------------------------------------------------------------------------------------- background saves


class _AsyncStrategy:
    """Writes a DCP-looking directory; ``save_async`` returns a future the test resolves (a slow background write)."""

    spec = strategy_spec("ddp")

    def __init__(self) -> None:
        from types import SimpleNamespace

        from launcher.train.schedule import build_scheduler

        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        self.scheduler = build_scheduler(optimizer, SimpleNamespace(warmup_steps=1, max_steps=4, min_lr_ratio=0.1))
        self.writes: List[Future] = []
        self.sync_saves = 0

    def _write(self, directory: Path) -> None:
        (directory / "dcp").mkdir()
        (directory / "dcp" / ".metadata").write_bytes(b"m" * 7)
        (directory / "dcp" / "__0_0.distcp").write_bytes(b"x" * 1000)

    def save(self, directory: Path) -> None:
        self.sync_saves += 1
        self._write(directory)

    def save_async(self, directory: Path) -> Future:
        self._write(directory)  # the files exist; "on disk" is what the future says
        future: Future = Future()
        self.writes.append(future)
        return future


def _env() -> D.DistEnv:
    return D.DistEnv(rank=0, local_rank=0, world_size=1, backend="gloo", device=torch.device("cpu"), source="single")


def test_complete_comes_only_after_the_background_write(tmp_path: Path) -> None:
    strategy = _AsyncStrategy()
    manager = CheckpointManager(tmp_path, _env(), strategy, keep_last=5, keep_every=None, async_save=True)
    assert manager.save(2, {"sampler": {}}) is None
    assert not (tmp_path / "step-2").exists() and not (tmp_path / "step-2.tmp" / COMPLETE).exists()
    assert manager.find_latest() is None and manager.finished() == []  # still writing: nothing to resume from

    strategy.writes[0].set_result(None)
    manager.wait()
    (result,) = manager.finished()
    assert result["step"] == 2 and result["async"] and 0 <= result["blocked_s"] <= result["save_s"]
    assert manager.find_latest() == tmp_path / "step-2"

    assert manager.save(4, {"sampler": {}}) is None
    strategy.writes[1].set_exception(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):  # a failed background write surfaces in the loop
        manager.wait()
    assert manager.find_latest() == tmp_path / "step-2" and (tmp_path / "step-4.tmp").is_dir()

    final = manager.save(6, {"sampler": {}}, final=True)  # the last save of an attempt is synchronous
    assert final is not None and not final["async"] and strategy.sync_saves == 1
    assert manager.find_latest() == tmp_path / "step-6"


# ------------------------------------------------------------------------------------------------- end to end


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _wait_until(condition, procs: List[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("training ended early:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def _kill_9(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants: torchrun starts each worker in a session of its own, and cannot pass on a
    SIGKILL (a node failure, the OOM killer)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    victims, todo = [], [pid]
    while todo:
        victims.append(todo.pop())
        todo += children.get(victims[-1], [])
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _max_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@pytest.mark.slow
def test_lora_checkpoints_hold_the_adapters_and_resume_bit_identically(
    train_launcher: TrainLauncher, tmp_path: Path
) -> None:
    lora = train_launcher.make_run("lora-small", ["peft=lora", *SMALL_MODEL])
    check_ok(train_launcher.spawn(lora))
    full = train_launcher.make_run("full-small", [*SMALL_MODEL, "train.max_steps=1", "train.eval_every=0",
                                                   "train.export=false"])
    check_ok(train_launcher.single(full))  # the size of a full checkpoint of the same model (one rank or two)

    adapter_ckpt, full_ckpt = lora / "checkpoints" / "step-8", full / "checkpoints" / "step-1"
    state = json.loads((adapter_ckpt / "trainer_state.json").read_text())
    assert state["base_fingerprint"]["source"] == "config" and state["base_fingerprint"]["seed"] == 1234
    ratio = _dir_bytes(adapter_ckpt) / _dir_bytes(full_ckpt)
    assert ratio < 0.05, (ratio, _dir_bytes(adapter_ckpt), _dir_bytes(full_ckpt))

    # Resume from step 4 (as after a crash): the same losses, bit for bit, with the base rebuilt from its seed.
    resumed = copy_run(lora, tmp_path / "lora-resumed", {})
    shutil.rmtree(resumed / "checkpoints" / "step-8")
    shutil.rmtree(resumed / "export")
    result = train_launcher.spawn(resumed)
    check_ok(result)
    assert "(step 4)" in result.stdout, result.stdout[-3000:]
    assert losses(resumed) == losses(lora)

    # Another base (its seed changed): one clear line, exit 2, nothing trained.
    other = copy_run(lora, tmp_path / "lora-other-base", {"train.seed": 7, "train.max_steps": 10})
    refused = train_launcher.single(other)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "holds LoRA adapters for another base model" in refused.stderr and "train.seed (1234 -> 7)" in \
        refused.stderr, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert max(losses(other)) == 8


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_lora_checkpoints_leave_the_base_out_and_resume_bit_identically(
    train_launcher: TrainLauncher, deepspeed_ops: None, tmp_path: Path, strategy: str
) -> None:
    """DeepSpeed's side of adapter-only checkpoints: exclude_frozen_parameters on save, a non-strict module load."""
    run_dir = train_launcher.make_run(f"zero-lora-{strategy}", ["peft=lora", f"strategy={strategy}", "train.export=false"])
    check_ok(train_launcher.spawn(run_dir))
    states = run_dir / "checkpoints" / "step-4" / "deepspeed"
    saved = [k for f in states.glob("*model_states.pt") for k in torch.load(f, weights_only=False)["module"] or {}]
    assert not [k for k in saved if "lora_" not in k], saved  # no frozen base weights in the module states
    resumed = copy_run(run_dir, tmp_path / f"zero-lora-{strategy}-resumed", {})
    shutil.rmtree(resumed / "checkpoints" / "step-8")
    result = train_launcher.spawn(resumed)
    check_ok(result)
    assert "(step 4)" in result.stdout, result.stdout[-3000:]
    assert losses(resumed) == losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp"])  # ddp runs the same code (TorchNativeStrategy); fsdp adds DTensors
def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(
    train_launcher: TrainLauncher, strategy: str
) -> None:
    """Each write takes 4 s more (a slow file system): step-2 commits while training goes on, then kill -9 while
    step-4 is still being written. The rerun resumes from step 2 and repeats steps 3-5 bit-identically."""
    run_dir = train_launcher.make_run(f"async-kill-{strategy}", [
        f"strategy={strategy}", "train.async_save=true", "train.save_every=2", "train.debug_save_sleep_s=4",
        "train.debug_step_sleep_s=0.3", "train.eval_every=0"])
    ckpts = run_dir / "checkpoints"
    proc = subprocess.Popen(train_launcher.torchrun_command(run_dir), env=train_launcher.env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: (ckpts / "step-2" / COMPLETE).is_file() and _max_step(run_dir) >= 5, [proc])
        assert (ckpts / "step-4.tmp").is_dir() and not (ckpts / "step-4").exists()  # step-4 still being written
    finally:
        _kill_9(proc.pid)
        proc.communicate(timeout=60)
    before = losses(run_dir)
    (event,) = [r for r in records(run_dir) if r.get("event") == "checkpoint"]
    assert event["step"] == 2 and event["async"] and event["save_s"] >= 4, event
    assert event["blocked_s"] <= 0.3 * event["save_s"], event  # the loop waited for the copy, not the write

    rerun = copy_run(run_dir, run_dir.with_name(run_dir.name + "-rerun"),
                      {"train.debug_save_sleep_s": 0, "train.debug_step_sleep_s": 0, "train.export": False})
    result = train_launcher.spawn(rerun)
    check_ok(result)
    out = result.stdout + result.stderr
    assert "(step 2)" in out and "step-4.tmp (a crash during a save)" in out, out[-3000:]
    after = losses(rerun)
    assert sorted(after) == list(range(1, 9)) and all(after[s] == before[s] for s in before), (before, after)
    events = [r for r in records(rerun) if r.get("event") == "checkpoint"]
    assert [e["step"] for e in events] == [2, 4, 6, 8] and not events[-1]["async"]  # the last one: synchronous


def _stop_with_sigterm(launcher: TrainLauncher, run_dir: Path, nproc: int, at_step: int = 3) -> str:
    single = [sys.executable, "-m", "launcher.train", str(run_dir)]
    command = launcher.torchrun_command(run_dir, nproc) if nproc > 1 else single
    proc = subprocess.Popen(command, env=launcher.env(), cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _wait_until(lambda: _max_step(run_dir) >= at_step, [proc])
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert "after a checkpoint: exit 3" in out, out[-4000:]
    return out


def _expected_sampler(saved: dict, steps: int, *, micro: int, accum: int, world: int) -> dict:
    """Where the sampler must be after ``steps`` more optimizer steps on ``world`` ranks from ``saved``."""
    from launcher.train.sampler import ResumableSampler

    sampler = ResumableSampler(saved["num_samples"], global_batch_size=micro * world, rank=0, world_size=world,
                               seed=saved["seed"])
    sampler.load_state_dict(saved)
    for _ in range(steps * accum):
        sampler.next_indices()
    return sampler.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,before,after", [("zero2", 2, 1), ("zero3", 2, 1), ("zero2", 1, 2),
                                                   ("zero3", 1, 2)])
def test_zero_resumes_on_another_world_size_through_the_universal_checkpoint(
    train_launcher: TrainLauncher, deepspeed_ops: None, strategy: str, before: int, after: int
) -> None:
    run_dir = train_launcher.make_run(f"universal-{strategy}-{before}to{after}", [
        f"strategy={strategy}", "train.save_every=100", "train.debug_step_sleep_s=0.3", "train.eval_every=0",
        "train.export=false"])
    _stop_with_sigterm(train_launcher, run_dir, before)
    (stopped_dir,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")]
    stopped = json.loads((stopped_dir / "trainer_state.json").read_text())
    assert stopped["world_size"] == before

    result = train_launcher.spawn(run_dir, nproc=after) if after > 1 else train_launcher.single(run_dir)
    check_ok(result)
    out = result.stdout + result.stderr
    assert f"written by {before} ranks) on {after} ranks" in out and "universal checkpoint" in out, out[-4000:]
    assert f"(step {stopped['step']})" in out
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 9)) and all(math.isfinite(v) for v in curve.values())
    assert curve[stopped["step"] + 1] < curve[1] - 0.5, curve  # the trained weights came back, not a fresh model
    final = json.loads((run_dir / "checkpoints" / "step-8" / "trainer_state.json").read_text())
    assert final["world_size_changes"] == [{"step": stopped["step"], "from": before, "to": after}]
    # The data continued at the saved sample: the sampler moved exactly (8 - stopped) steps of the new world.
    assert final["sampler"] == _expected_sampler(stopped["sampler"], 8 - stopped["step"], micro=4, accum=2,
                                                 world=after)
    assert (stopped_dir / "deepspeed-universal" / "zero").is_dir()
