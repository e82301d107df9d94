"""Installed package versions, read from their metadata (stdlib only: importing deepspeed or peft to read
``__version__`` costs seconds per rank, and torch on the login node)."""

from __future__ import annotations

import importlib.metadata
from typing import Optional


def package_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
