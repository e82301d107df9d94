"""Fixtures of the training tests (tests/test_train_*.py): run directories and 2-process CPU launches.

Every launch is a real ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m launcher.train RUN_DIR``
(or the Slurm-style two ``python -m launcher.train`` processes), ``OMP_NUM_THREADS=1``. DeepSpeed JIT-builds its
shared-memory communication op once into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``; CI caches
that directory): ``deepspeed_ops`` builds it before the first zero* run so that ranks never race to build it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
from launcher.config.strategies import STRATEGY_NAMES as STRATEGIES  # noqa: E402


# Files that read the session fixture ``full_runs`` (5 training runs): one worker, so it runs once.
FULL_RUNS_FILES = ("tests/test_train_strategies.py", "tests/test_train_resume.py")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Under xdist (``-n 2 --dist loadgroup``, as .ci/run runs): every test that submits to the local Slurm runs on
    the same worker, in file order, so their jobs never compete for its nodes; every other file stays on one worker,
    so its module fixtures (the training runs most tests read) run once, not once per worker; the files that share
    ``full_runs`` share a worker too. Without xdist the marker does nothing."""
    for item in items:
        path = item.nodeid.split("::")[0]
        group = "slurm" if item.get_closest_marker("slurm") else "full-runs" if path in FULL_RUNS_FILES else path
        item.add_marker(pytest.mark.xdist_group(group))


# One tiny setup for every training test: 2 ranks x 4 sequences x 2 accumulation steps of 32 tokens per step.
BASE_OVERRIDES = [
    "model=tiny", "data=corpus", "train.seq_len=32", "train.micro_batch_size=4", "train.grad_accum=2",
    "train.max_steps=8", "train.warmup_steps=2", "train.lr=3e-3", "train.eval_every=4", "train.eval_batches=2",
    "train.save_every=4", "train.log_every=1",
]


class TrainLauncher:
    """Creates run directories under one session folder and launches training on them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def make_run(self, name: str, overrides: Sequence[str] = (), *, login_checks: bool = True) -> Path:
        """A run directory with the config a user would get: composed, validated and resolved as the command line
        does (a test cannot train with a config the launcher refuses). ``login_checks=False`` only for tests of the
        job's own guards against what the login node could not see."""
        from launcher.config import compose, validated
        from launcher.rundir import write_config

        overrides = [*BASE_OVERRIDES, f"output_dir={self.root}", f"run_name={name}", *overrides]
        run_dir = self.root / name
        # One session folder for every file: a reused name would resume the other test's checkpoints silently.
        assert not run_dir.exists(), f"run name {name!r} is already used in this test session"
        cfg = validated(overrides) if login_checks else compose(overrides)
        write_config(run_dir, cfg)
        return run_dir

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(
            OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        env.update(extra or {})
        return env

    def torchrun_command(self, run_dir: Path, nproc: int = 2) -> List[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "launcher.train", str(run_dir)]

    def torchrun(self, run_dir: Path, *, nproc: int = 2, env: Optional[Dict[str, str]] = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.torchrun_command(run_dir, nproc), env=self.env(env), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def spawn(self, run_dir: Path, *, nproc: int = 2, env: Optional[Dict[str, str]] = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
        """``nproc`` ranks started directly with the variables torchrun gives its workers (RANK, LOCAL_RANK,
        WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT): the job sees what it sees under torchrun, without the agent
        process, which costs 1.5 CPU-seconds of a 9-second launch on this 2-core machine. The tests of torchrun
        itself (its signal forwarding, the local launch) keep ``torchrun``. As torchrun's agent does, a failed rank
        has the others stopped; the exit code is the first failed rank's, the output rank 0's and then rank 1's."""
        port = free_port()
        procs, logs = [], []
        for rank in range(nproc):
            rank_env = self.env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                                 "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                 **(env or {})})
            logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
            procs.append(subprocess.Popen([sys.executable, "-m", "launcher.train", str(run_dir)], env=rank_env,
                                          cwd=REPO, text=True, stdout=logs[-1][0], stderr=logs[-1][1]))
        code = _wait_for_ranks(procs, timeout)
        outputs = []
        for handles in logs:
            outputs.append([])
            for handle in handles:
                handle.seek(0)
                outputs[-1].append(handle.read())
                handle.close()
        return subprocess.CompletedProcess(procs[0].args, code, "".join(o[0] for o in outputs),
                                           "".join(o[1] for o in outputs))

    def single(self, run_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launcher.train", str(run_dir)], env=self.env(), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ranks(procs: List[subprocess.Popen], timeout: float, grace_s: float = 10.0) -> int:
    """Wait for every rank; once one fails, the others get ``grace_s`` and are then killed (torchrun's agent stops
    them too). Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds, every rank killed."""
    deadline, failed_at, failure = time.monotonic() + timeout, None, 0
    while any(p.poll() is None for p in procs):
        codes = [p.returncode for p in procs if p.returncode]
        if codes and failed_at is None:
            failed_at, failure = time.monotonic(), codes[0]
        if time.monotonic() > deadline or (failed_at is not None and time.monotonic() > failed_at + grace_s):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if failed_at is None:
                raise subprocess.TimeoutExpired(procs[0].args, timeout)
            break
        time.sleep(0.05)
    return failure or next((p.returncode for p in procs if p.returncode), 0)


def records(run_dir: Path) -> List[dict]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def losses(run_dir: Path) -> Dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="session")
def train_launcher(tmp_path_factory: pytest.TempPathFactory) -> TrainLauncher:
    pytest.importorskip("torch")
    return TrainLauncher(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """Build (or load from the cache) DeepSpeed's CPU shared-memory op once, before any zero* run."""
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)


@pytest.fixture(scope="session")
def full_runs(train_launcher: TrainLauncher, deepspeed_ops: None) -> Dict[str, Path]:
    """Full training with every strategy (the same seed, data and batches): 8 steps each."""
    runs = {}
    for strategy in STRATEGIES:
        run_dir = train_launcher.make_run(f"full-{strategy}", [f"strategy={strategy}"])
        check_ok(train_launcher.spawn(run_dir))
        runs[strategy] = run_dir
    return runs


def copy_run(source: Path, target: Path, overrides: Dict[str, object]) -> Path:
    """A copy of a finished run directory with some config values changed (its checkpoints resume in the copy)."""
    import shutil

    from omegaconf import OmegaConf

    shutil.copytree(source, target)
    cfg = OmegaConf.load(target / "config.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, target / "config.yaml")
    return target
