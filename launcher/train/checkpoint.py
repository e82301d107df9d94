"""Atomic, resumable checkpoints under ``<run_dir>/checkpoints/step-<N>/``.

A save (every rank takes part):

1. the previous background save (if any) is waited for, and committed;
2. rank 0 creates ``step-<N>.tmp/`` (removing a leftover of a crashed save), barrier;
3. every rank writes its own RNG states (``rng/rank-<r>.pt``), then its part of the strategy's state (DeepSpeed
   ``save_checkpoint`` for zero*, torch.distributed.checkpoint for ddp and fsdp); each rank fsyncs the files it wrote.
   Frozen parameters (a LoRA run's base) are not written: ``trainer_state.json`` holds the base's fingerprint
   (``launcher.train.frozen_base``) and a resume on another base is refused;
4. barrier: everything is on disk;
5. rank 0 writes ``trainer_state.json`` (step, sampler position, scheduler, metrics position, config hash, strategy,
   world size and its changes, versions), then ``COMPLETE`` (a manifest of every file and its size: the one walk of
   the tree), fsyncs both, and renames ``step-<N>.tmp`` to ``step-<N>`` (atomic on POSIX file systems), then applies
   retention;
6. barrier.

With ``train.async_save`` (ddp, fsdp) step 3 only copies the state to host memory and returns; DCP writes the files in
a background thread, and step 5 runs in a second one (rank 0) once DCP's future says that every rank's files are on
disk (no barriers: DCP's own collectives order the ranks). The loop goes on training meanwhile; the final save (the
last step, a stop signal) is synchronous and first waits for the one in flight.

A directory counts as a checkpoint only when it is named ``step-<N>`` and its ``COMPLETE`` manifest matches the files
(names and sizes): a crash or ``kill -9`` at any point leaves either the previous checkpoint or a ``.tmp`` that resume
ignores. A truncated or half-deleted checkpoint fails the manifest check and is skipped with a warning naming it.

Retention: the newest ``train.keep_last`` checkpoints, plus every step that is a multiple of ``train.keep_every``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from launcher.rundir import COMPLETE_MARKER as COMPLETE
from launcher.rundir import STEP_DIR_RE as STEP_RE
from launcher.train.checkpoint_io import (
    fsync_dir, fsync_file, manifest, reseed, rng_state, set_rng_state, write_json,
)
from launcher.train.distributed import DistEnv, barrier, broadcast_object, log
from launcher.train.frozen_base import fingerprint_notes, fingerprint_problem
from launcher.train.schedule import restore_scheduler, scheduler_state

STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
FORMAT_VERSION = 1
# Fault injection for tests: "STEP" or "STEP:RANK" -> that rank dies (os._exit) right after writing its shard.
FAULT_ENV = "LAUNCHER_FAULT_KILL_IN_SAVE"

# Config keys that may change between attempts without changing the trained model.
BOOKKEEPING_KEYS = {
    "dry_run", "nodes", "nproc_per_node", "cluster", "export_only", "output_dir", "run_name", "ignore_memory_estimate",
    "train.max_steps", "train.save_every", "train.save_every_minutes", "train.keep_last", "train.keep_every",
    "train.eval_every", "train.eval_batches", "train.log_every", "train.tensorboard", "train.debug_step_sleep_s",
    "train.async_save", "train.debug_save_sleep_s", "data.cache_dir", "model.gradient_checkpointing",
    "peft.merge_on_export", "train.preflight", "train.export", "budget",
}


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be resumed here (names it and says what to do)."""


# ---------------------------------------------------------------------------------------------------------------
# Metadata helpers


def training_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of the config that defines the trained model (what the config hash covers), flattened."""
    flat: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if prefix in BOOKKEEPING_KEYS:
            return
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node if isinstance(node, (int, float, str, bool)) or node is None else repr(node)

    walk(cfg, "")
    return flat


def config_hash(cfg: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(training_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def versions() -> Dict[str, Optional[str]]:
    from launcher.versions import package_version

    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "deepspeed", "peft", "accelerate", "datasets"):
        out[name] = package_version(name)
    return out


def step_of(path: Path) -> Optional[int]:
    match = STEP_RE.match(path.name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A save whose files are being written in the background."""

    step: int
    done: "Future[Dict[str, Any]]"  # resolves after the commit (rank 0) or this rank's write (the others)
    blocked_s: float  # how long the loop waited in save()


def async_enabled(setting: Optional[bool], device_type: str) -> bool:
    """``train.async_save``: None means on for GPU jobs (their saves are the costly ones), off on CPU."""
    return device_type == "cuda" if setting is None else bool(setting)


class CheckpointManager:
    """Discovery, save, retention and load of ``<root>/step-<N>`` checkpoints for ``strategy`` (collective)."""

    def __init__(
        self,
        root: Path,
        env: DistEnv,
        strategy: Any,
        *,
        keep_last: int,
        keep_every: Optional[int],
        problem: Optional[Callable[[Path], Optional[str]]] = None,
        frozen_base: Optional[Dict[str, Any]] = None,
        async_save: bool = False,
    ) -> None:
        """``problem``: the engine's check of a checkpoint's files; default: the one of ``strategy.spec``.
        ``frozen_base``: the fingerprint of a LoRA run's base (``frozen_base.base_fingerprint``), None when every
        parameter trains. ``async_save``: write in the background where the engine can."""
        self.root = Path(root)
        self.env = env
        self.strategy = strategy
        self.keep_last = max(1, int(keep_last))
        self.keep_every = int(keep_every) if keep_every else None
        if problem is None:
            from launcher.train.strategies import checkpoint_problem

            problem = checkpoint_problem(strategy.spec)
        self.engine_problem = problem
        self.frozen_base = frozen_base
        self.async_save = async_save
        self.world_size_changes: List[Dict[str, int]] = []  # carried from checkpoint to checkpoint
        self._pending: Optional[_Pending] = None
        self._finished: List[Dict[str, Any]] = []
        self._committer: Optional[ThreadPoolExecutor] = None

    # -- discovery ----------------------------------------------------------------------------------------------
    def candidates(self) -> List[Tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(step_of(p), p) for p in self.root.iterdir() if p.is_dir()]
        return sorted(((s, p) for s, p in found if s is not None), reverse=True)

    def problem(self, path: Path) -> Optional[str]:
        """Why ``path`` is not a usable checkpoint, or None."""
        marker = path / COMPLETE
        if not marker.is_file():
            return "no COMPLETE marker (the save did not finish)"
        try:
            manifest = json.loads(marker.read_text())
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            return f"unreadable metadata ({e})"
        if state.get("step") != step_of(path):
            return f"{STATE_FILE} says step {state.get('step')}, the directory says {step_of(path)}"
        for rel, size in manifest.get("files", {}).items():
            file = path / rel
            if not file.is_file():
                return f"{rel} is missing"
            if file.stat().st_size != size:
                return f"{rel} is {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
        return self.engine_problem(path)

    def find_latest(self) -> Optional[Path]:
        """The newest complete checkpoint, decided by rank 0 and the same on every rank."""
        choice: Optional[str] = None
        if self.env.is_main:
            for _, path in self.candidates():
                reason = self.problem(path)
                if reason is None:
                    choice = str(path)
                    break
                log(f"WARNING: skipping checkpoint {path}: {reason}")
            for tmp in sorted(self.root.glob("step-*.tmp")) if self.root.is_dir() else []:
                log(f"WARNING: ignoring the unfinished save {tmp} (a crash during a save); it will be removed")
        choice = broadcast_object(choice)
        return Path(choice) if choice else None

    def read_state(self, path: Path) -> Dict[str, Any]:
        return json.loads((Path(path) / STATE_FILE).read_text())

    def remove_unfinished(self) -> None:
        if self.env.is_main and self.root.is_dir():
            for tmp in self.root.glob("step-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()

    # -- save ---------------------------------------------------------------------------------------------------
    def save(self, step: int, trainer_state: Dict[str, Any], *, final: bool = False) -> Optional[Dict[str, Any]]:
        """Collective. A synchronous save returns {"save_s", "blocked_s", "size_gb" (rank 0 only), "async": False};
        a background one returns None, and its result comes later from ``finished()``. ``final``: the last save of
        the attempt (end of training, a stop signal): synchronous, after the one in flight."""
        start = time.perf_counter()
        self.wait()  # one save in flight at most: its staging buffers are reused, its commit comes first
        # What the background commit writes must be what the state is now: the scheduler moves on meanwhile.
        trainer_state = {**trainer_state, "scheduler": scheduler_state(self.strategy.scheduler)}
        tmp = self.root / f"step-{step}.tmp"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / RNG_DIR).mkdir()
        barrier()

        # RNG first: every rank's file is on disk before its background write can report done to rank 0.
        rng_file = tmp / RNG_DIR / f"rank-{self.env.rank:05d}.pt"
        torch.save(rng_state(), rng_file)
        fsync_file(rng_file)
        writing = self.strategy.save_async(tmp) if self.async_save and not final else _sync_save(self.strategy, tmp)
        _maybe_inject_fault(step, self.env.rank)
        if writing is not None:
            done = self._background().submit(self._finish, step, tmp, trainer_state, writing, start)
            self._pending = _Pending(step, done, time.perf_counter() - start)
            return None
        barrier()
        size = self._commit(step, tmp, trainer_state) / 1e9 if self.env.is_main else 0.0
        barrier()
        elapsed = time.perf_counter() - start
        return {"step": step, "save_s": elapsed, "blocked_s": elapsed, "size_gb": size, "async": False}

    def _background(self) -> ThreadPoolExecutor:
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
        return self._committer

    def _finish(self, step: int, tmp: Path, trainer_state: Dict[str, Any], writing: Future,
                start: float) -> Dict[str, Any]:
        """In the background: wait for DCP's write (on rank 0: every rank's files and .metadata), then commit."""
        writing.result()
        size = self._commit(step, tmp, trainer_state) / 1e9 if self.env.is_main else 0.0
        return {"step": step, "save_s": time.perf_counter() - start, "size_gb": size, "async": True}

    def wait(self) -> None:
        """Block until the background save (if any) is written and committed; its result goes to ``finished()``.
        Re-raises its error: a save that failed must not pass silently."""
        pending, self._pending = self._pending, None
        if pending is not None:
            result = pending.done.result()
            self._finished.append({**result, "blocked_s": pending.blocked_s})

    def finished(self) -> List[Dict[str, Any]]:
        """Results of background saves that completed since the last call (never blocks)."""
        if self._pending is not None and self._pending.done.done():
            self.wait()
        done, self._finished = self._finished, []
        return done

    def _commit(self, step: int, tmp: Path, trainer_state: Dict[str, Any]) -> int:
        """Rank 0, once every rank's files are on disk: metadata, manifest, rename, retention. Returns the bytes."""
        state = dict(trainer_state)
        state.update(
            step=step,
            format=FORMAT_VERSION,
            world_size=self.env.world_size,
            world_size_changes=list(self.world_size_changes),
            base_fingerprint=self.frozen_base,
            strategy=self.strategy.spec.name,
            versions=versions(),
            saved_unix=time.time(),
        )
        write_json(tmp / STATE_FILE, state)
        files = manifest(tmp)
        size = sum(files.values()) + write_json(tmp / COMPLETE, {"step": step, "files": files})
        fsync_dir(tmp)
        final = self.root / f"step-{step}"
        if final.exists():  # the same step saved again (e.g. a finished run re-run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        self.apply_retention()
        return size

    def apply_retention(self) -> List[Path]:
        complete = [(s, p) for s, p in self.candidates() if (p / COMPLETE).is_file()]
        keep = {s for s, _ in complete[: self.keep_last]}
        if self.keep_every:
            keep |= {s for s, _ in complete if s % self.keep_every == 0}
        removed = []
        for step, path in complete:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # -- load ---------------------------------------------------------------------------------------------------
    def check_compatible(
        self, path: Path, state: Mapping[str, Any], *, cfg_hash: str, cfg_flat: Mapping[str, Any]
    ) -> None:
        name = self.strategy.spec.name
        saved_strategy = state.get("strategy")
        if saved_strategy != name:
            raise CheckpointError(
                f"{path} was written by strategy={saved_strategy}; this run uses strategy={name}. "
                f"Resume with strategy={saved_strategy}, or start a new run_name from an export "
                f"(export_only=true with strategy={saved_strategy}, then model.pretrained=<run_dir>/export)"
            )
        self._check_base(path, state.get("base_fingerprint"))
        self._check_world_size(path, state, cfg_flat)
        if state.get("config_hash") not in (None, cfg_hash):
            saved = state.get("training_config", {})
            changed = sorted(k for k in set(saved) | set(cfg_flat) if saved.get(k) != cfg_flat.get(k))
            log(
                f"WARNING: the config differs from the one that wrote {path} in: {', '.join(changed) or '?'}; "
                "resuming anyway (the loss curve will not match an uninterrupted run)"
            )

    def _check_base(self, path: Path, saved: Optional[Mapping[str, Any]]) -> None:
        """A checkpoint without the frozen base resumes only on the same base (its fingerprint)."""
        if saved and self.frozen_base is None:
            raise CheckpointError(
                f"{path} holds only LoRA adapters (its base is not in the checkpoint); this run trains every "
                "parameter (peft=none): resume with peft=lora, or start a new run_name"
            )
        if self.frozen_base is None:
            return
        problem = fingerprint_problem(saved, self.frozen_base)
        if problem:
            raise CheckpointError(
                f"{path} holds LoRA adapters for another base model: {problem}. Resume with the base it was trained "
                "on, or start a new run_name (its adapters: export_only=true with the old base)"
            )
        for note in fingerprint_notes(saved, self.frozen_base):
            log(f"WARNING: {path}: {note}")

    def _check_world_size(self, path: Path, state: Mapping[str, Any], cfg_flat: Mapping[str, Any]) -> None:
        saved_world, world = int(state.get("world_size", self.env.world_size)), self.env.world_size
        if saved_world == world:
            return
        how = f"through {self.strategy.spec.reshards_through}"
        micro, accum = cfg_flat.get("train.micro_batch_size"), cfg_flat.get("train.grad_accum")
        new_batch = int(micro) * int(accum) * world if micro and accum else "?"
        old_batch = state.get("global_batch_sequences", "?")
        log(
            f"WARNING: resuming {path} (written by {saved_world} ranks) on {world} ranks: weights and optimizer "
            f"reshard {how}; the data continues at the same sample (sampler position {state.get('sampler')}); "
            f"the global batch changes from {old_batch} to {new_batch} sequences per optimizer step "
            f"(train.micro_batch_size={micro} x train.grad_accum={accum} x {world} ranks; train.global_batch_size "
            "keeps it fixed); the learning-rate schedule counts optimizer steps, so it continues unchanged while "
            "each step sees a different number of samples; per-rank RNG streams restart"
        )

    def load(self, path: Path, *, seed: int) -> Dict[str, Any]:
        """Collective: restore the strategy (model, optimizer, scheduler) and this rank's RNG. Returns trainer state."""
        path = Path(path)
        state = self.read_state(path)
        start = time.perf_counter()
        self.strategy.load(path)
        if "scheduler" in state:
            restore_scheduler(self.strategy.scheduler, state["scheduler"])
        saved_world = int(state.get("world_size", self.env.world_size))
        self.world_size_changes = list(state.get("world_size_changes", []))
        if saved_world != self.env.world_size:  # recorded in every later checkpoint's trainer_state.json
            self.world_size_changes.append({"step": int(state["step"]), "from": saved_world,
                                            "to": self.env.world_size})
        rng_file = path / RNG_DIR / f"rank-{self.env.rank:05d}.pt"
        if saved_world == self.env.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            reseed(seed, self.env.rank, int(state["step"]))
        barrier()
        log(f"resumed from {path} (step {state['step']}) in {time.perf_counter() - start:.1f}s")
        return state


def _sync_save(strategy: Any, directory: Path) -> None:
    """``strategy.save``: the files are on disk when it returns (no future)."""
    strategy.save(directory)
    return None


def _maybe_inject_fault(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == step and (len(parts) < 2 or int(parts[1]) == rank):
        print(f"train: [rank {rank}] {FAULT_ENV}={spec}: dying in the middle of the save of step {step}", flush=True)
        sys.stdout.flush()
        os._exit(86)
