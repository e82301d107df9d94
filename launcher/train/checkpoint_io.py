"""Durable files of a checkpoint: fsync'd writes, the manifest walk, and the RNG states of a rank.

Used by ``launcher.train.checkpoint`` (and the engines for the files they write): what the write and fsync functions
wrote is on stable storage when they return.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping

import numpy as np
import torch

from launcher.rundir import COMPLETE_MARKER as COMPLETE


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


def fsync_dir(path: Path) -> None:
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


def write_json(path: Path, data: Any) -> int:
    """Write and fsync; returns the bytes written."""
    text = json.dumps(data, indent=1, sort_keys=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return len(text.encode("utf-8"))


def manifest(directory: Path) -> Dict[str, int]:
    """Every file under ``directory`` (but COMPLETE) and its size: one walk, one stat per file."""
    files = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, directory)
            if rel != COMPLETE:
                files[rel] = os.stat(path).st_size
    return files


def reseed(seed: int, rank: int, step: int = 0) -> None:
    value = (seed * 1_000_003 + rank * 10_007 + step) % (2**32)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
