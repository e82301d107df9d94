"""Shared helpers of the login-node tests (no torch anywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

from launcher.config import compose
from launcher.config.schema import as_container

REPO = Path(__file__).resolve().parents[1]
LUMI_ACCOUNT = "cluster.account=project_465000123"
LEONARDO_ACCOUNT = "cluster.account=EUHPC_D35_189"


def config(overrides: Sequence[str]) -> Dict[str, Any]:
    return as_container(compose(overrides))


def run_launcher(args: Sequence[str], *, cwd: Path, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )
