"""Runs without +cluster: training on this machine, one process per visible GPU (else one), via torchrun."""

from __future__ import annotations

import importlib.util
import os
import shlex
import re
import subprocess
import sys
from pathlib import Path
from typing import List, TextIO

from launcher.config.schema import LauncherConfig
from launcher.rundir import EXIT_BAD_INPUT

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
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    errors = RankErrors()
    assert process.stderr is not None
    for line in process.stderr:
        errors.forward(line, sys.stderr)
    code = process.wait()
    # torchrun exits 1 for any failed rank: a rank's bad-input line means the user's input, as on the login node.
    return EXIT_BAD_INPUT if code and errors.bad_input else code


class RankErrors:
    """Filters torchrun's stderr: each rank's error line once (every rank reports the same bad input), and nothing of
    the agent's ChildFailedError report that follows a failed rank (its traceback is torchrun's, not the user's)."""

    _RANK_LINE = re.compile(r"^train: \[rank \d+\] (error|stopping): (.*)$")
    _AGENT_LOG = re.compile(r"^[EW]\d{4} .*torch/distributed/elastic/")  # the agent's own log lines

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.bad_input = False
        self.agent_report = False

    def forward(self, line: str, out: TextIO) -> None:
        if self.agent_report:
            return
        if self._AGENT_LOG.match(line):
            # Stopping the other ranks (W), then the failure report (E ...) and its traceback: all the agent's.
            self.agent_report = line.startswith("E")
            return
        match = self._RANK_LINE.match(line.rstrip("\n"))
        if match is None:
            out.write(line)
            out.flush()
            return
        kind, message = match.groups()
        self.bad_input = self.bad_input or kind == "error"
        if kind == "error" and message not in self.seen:
            self.seen.add(message)
            out.write(f"launcher: error: {message}\n")
            out.flush()
