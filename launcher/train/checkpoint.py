"""Atomic, resumable checkpoints under ``<run_dir>/checkpoints/step-<N>/``.

A save (every rank takes part):

1. rank 0 creates ``step-<N>.tmp/`` (removing a leftover of a crashed save), barrier;
2. every rank writes its part: the strategy's state (DeepSpeed ``save_checkpoint`` for zero*,
   torch.distributed.checkpoint for ddp and fsdp) and its own RNG states (``rng/rank-<r>.pt``); each rank fsyncs the
   files it wrote;
3. barrier: everything is on disk;
4. rank 0 writes ``trainer_state.json`` (step, sampler position, scheduler, metrics position, config hash, strategy,
   world size, versions), then ``COMPLETE`` (a manifest of every file and its size: the one walk of the tree),
   fsyncs both, and renames ``step-<N>.tmp`` to ``step-<N>`` (atomic on POSIX file systems), then applies retention;
5. barrier.

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
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from launcher.train.distributed import DistEnv, barrier, broadcast_object, log
from launcher.train.schedule import restore_scheduler, scheduler_state

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
RNG_DIR = "rng"
STEP_RE = re.compile(r"^step-(\d+)$")
FORMAT_VERSION = 1
# Fault injection for tests: "STEP" or "STEP:RANK" -> that rank dies (os._exit) right after writing its shard.
FAULT_ENV = "LAUNCHER_FAULT_KILL_IN_SAVE"

# Config keys that may change between attempts without changing the trained model.
BOOKKEEPING_KEYS = {
    "dry_run", "nodes", "nproc_per_node", "cluster", "export_only", "output_dir", "run_name", "ignore_memory_estimate",
    "train.max_steps", "train.save_every", "train.save_every_minutes", "train.keep_last", "train.keep_every",
    "train.eval_every", "train.eval_batches", "train.log_every", "train.tensorboard", "train.debug_step_sleep_s",
    "data.cache_dir", "model.gradient_checkpointing", "peft.merge_on_export", "train.preflight", "train.export", "budget",
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
    from launcher.train.strategies.base import package_version

    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "deepspeed", "peft", "accelerate", "datasets"):
        out[name] = package_version(name)
    return out


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to stable storage (every rank calls it on the files it wrote)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> int:
    """Write and fsync; returns the bytes written."""
    text = json.dumps(data, indent=1, sort_keys=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return len(text.encode("utf-8"))


def _manifest(directory: Path) -> Dict[str, int]:
    """Every file under ``directory`` (but COMPLETE) and its size: one walk, one stat per file."""
    files = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, directory)
            if rel != COMPLETE:
                files[rel] = os.stat(path).st_size
    return files


def step_of(path: Path) -> Optional[int]:
    match = STEP_RE.match(path.name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------------------


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
    ) -> None:
        """``problem``: the engine's check of a checkpoint's files; default: the one of ``strategy.spec``."""
        self.root = Path(root)
        self.env = env
        self.strategy = strategy
        self.keep_last = max(1, int(keep_last))
        self.keep_every = int(keep_every) if keep_every else None
        if problem is None:
            from launcher.train.strategies import checkpoint_problem

            problem = checkpoint_problem(strategy.spec)
        self.engine_problem = problem

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
    def save(self, step: int, trainer_state: Dict[str, Any]) -> Dict[str, float]:
        """Collective. Returns {"save_s": seconds, "size_gb": size} (size on rank 0 only)."""
        start = time.perf_counter()
        tmp = self.root / f"step-{step}.tmp"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / RNG_DIR).mkdir()
        barrier()

        self.strategy.save(tmp)  # fsyncs this rank's files
        rng_file = tmp / RNG_DIR / f"rank-{self.env.rank:05d}.pt"
        torch.save(rng_state(), rng_file)
        fsync_file(rng_file)
        _maybe_inject_fault(step, self.env.rank)
        barrier()

        size = self._commit(step, tmp, trainer_state) / 1e9 if self.env.is_main else 0.0
        barrier()
        return {"save_s": time.perf_counter() - start, "size_gb": size}

    def _commit(self, step: int, tmp: Path, trainer_state: Dict[str, Any]) -> int:
        """Rank 0, once every rank's files are on disk: metadata, manifest, rename, retention. Returns the bytes."""
        state = dict(trainer_state)
        state.update(
            step=step,
            format=FORMAT_VERSION,
            world_size=self.env.world_size,
            strategy=self.strategy.spec.name,
            versions=versions(),
            saved_unix=time.time(),
            scheduler=scheduler_state(self.strategy.scheduler),
        )
        _write_json(tmp / STATE_FILE, state)
        files = _manifest(tmp)
        size = sum(files.values()) + _write_json(tmp / COMPLETE, {"step": step, "files": files})
        _fsync_dir(tmp)
        final = self.root / f"step-{step}"
        if final.exists():  # the same step saved again (e.g. a finished run re-run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
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
        saved_world = int(state.get("world_size", self.env.world_size))
        if saved_world != self.env.world_size and not self.strategy.spec.reshards_on_resume:
            raise CheckpointError(
                f"{path} was written by {saved_world} ranks with {name}; this run has "
                f"{self.env.world_size}. ZeRO optimizer state is partitioned per rank and does not reshard here: "
                f"resume with {saved_world} ranks (nodes x tasks per node), or export it (export_only=true with "
                f"{saved_world} ranks) and continue in a new run with model.pretrained=<run_dir>/export "
                "(fresh optimizer), or use strategy=fsdp, whose checkpoints reshard"
            )
        if saved_world != self.env.world_size:
            log(
                f"WARNING: resuming {path} (written by {saved_world} ranks) on {self.env.world_size} ranks: "
                "weights and optimizer reshard; the data position continues at the same sample, but the global "
                "batch changes unless train.grad_accum compensates, and per-rank RNG streams restart"
            )
        if state.get("config_hash") not in (None, cfg_hash):
            saved = state.get("training_config", {})
            changed = sorted(k for k in set(saved) | set(cfg_flat) if saved.get(k) != cfg_flat.get(k))
            log(
                f"WARNING: the config differs from the one that wrote {path} in: {', '.join(changed) or '?'}; "
                "resuming anyway (the loss curve will not match an uninterrupted run)"
            )

    def load(self, path: Path, *, seed: int) -> Dict[str, Any]:
        """Collective: restore the strategy (model, optimizer, scheduler) and this rank's RNG. Returns trainer state."""
        path = Path(path)
        state = self.read_state(path)
        start = time.perf_counter()
        self.strategy.load(path)
        if "scheduler" in state:
            restore_scheduler(self.strategy.scheduler, state["scheduler"])
        rng_file = path / RNG_DIR / f"rank-{self.env.rank:05d}.pt"
        if int(state.get("world_size", -1)) == self.env.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            reseed(seed, self.env.rank, int(state["step"]))
        barrier()
        log(f"resumed from {path} (step {state['step']}) in {time.perf_counter() - start:.1f}s")
        return state


def reseed(seed: int, rank: int, step: int = 0) -> None:
    value = (seed * 1_000_003 + rank * 10_007 + step) % (2**32)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _maybe_inject_fault(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == step and (len(parts) < 2 or int(parts[1]) == rank):
        print(f"train: [rank {rank}] {FAULT_ENV}={spec}: dying in the middle of the save of step {step}", flush=True)
        sys.stdout.flush()
        os._exit(86)
