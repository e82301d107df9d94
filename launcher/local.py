"""Runs without +cluster: training on this machine, one process per visible GPU (else one), via torchrun."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

from launcher.config.schema import LauncherConfig

from launcher.errors import ConfigError


def visible_gpus() -> int:
    """GPUs this process may use, counted without importing torch (the login path stays light)."""
    for var in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            return len([d for d in value.split(",") if d.strip() and d.strip() != "-1"])
    nvidia = list(Path("/dev").glob("nvidia[0-9]*"))
    if nvidia:
        return len(nvidia)
    kfd_nodes = Path("/sys/class/kfd/kfd/topology/nodes")
    if Path("/dev/kfd").exists() and kfd_nodes.is_dir():
        # KFD lists CPUs too; GPU nodes have a non-zero gpu_id.
        ids = [(n / "gpu_id").read_text().strip() for n in kfd_nodes.iterdir() if (n / "gpu_id").exists()]
        return len([i for i in ids if i not in ("", "0")])
    return 0


def processes_per_node(cfg: LauncherConfig) -> int:
    return cfg.nproc_per_node or max(1, visible_gpus())


def local_command(cfg: LauncherConfig, run_dir: Path) -> List[str]:
    nproc = processes_per_node(cfg)
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "launcher.train", str(run_dir),
    ]


def describe(command: List[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


def run_local(cfg: LauncherConfig, run_dir: Path) -> int:
    """Train in this terminal; Ctrl-C or SIGTERM reaches every rank, which checkpoint before exiting."""
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(
            "+cluster", None, "a cluster profile, or the training packages installed here",
            "this machine has no torch: pip install '.[train]' (or use +cluster=NAME to submit)",
        )
    command = local_command(cfg, run_dir)
    env = dict(os.environ)
    # A run launched from a checkout must import that checkout in the workers too.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    print(f"launcher: {describe(command)}", flush=True)
    return subprocess.call(command, env=env)
