"""Shared helpers of the login-node tests (no torch anywhere)."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

from launcher.config import compose, validated
from launcher.config.schema import LauncherConfig, as_container

REPO = Path(__file__).resolve().parents[1]
LUMI_ACCOUNT = "cluster.account=project_465000123"
LEONARDO_ACCOUNT = "cluster.account=EUHPC_D35_189"


def config(overrides: Sequence[str]) -> LauncherConfig:
    """The config a run with these overrides really gets: composed, validated and typed, as the command line does."""
    return validated(overrides)


def composed(overrides: Sequence[str]) -> Dict[str, Any]:
    """The composed tree before validation (for the tests of validation itself)."""
    return as_container(compose(overrides))


def run_launcher(args: Sequence[str], *, cwd: Path, env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )


def assert_matches_golden(path: Path, text: str) -> None:
    """Compare with a golden file; UPDATE_GOLDEN=1 rewrites it (review the diff before committing)."""
    import pytest

    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "rendered"))
        pytest.fail(f"{path.name} differs from its golden file (UPDATE_GOLDEN=1 to regenerate, then review):\n{diff}")
