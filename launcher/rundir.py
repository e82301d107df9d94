"""The run directory: <output_dir>/<run_name>/ with the resolved config the job reads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

CONFIG_FILE = "config.yaml"


def write_config(run_dir: Path, cfg: Mapping[str, Any]) -> Path:
    """Write the resolved config atomically (a job may be reading the previous one)."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(dict(cfg))))
    tmp.replace(path)
    return path


def write_script(run_dir: Path, script: str, name: str = "job.sh") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(script)
    return path
