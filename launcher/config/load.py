"""Saved config back to the schema dataclasses: ``read_run_config(run_dir) -> LauncherConfig`` (the job, tools).

``config.yaml`` is merged into the schema, so every value has its schema type and absent keys their defaults, after
dropping the keys an older launcher wrote (``RETIRED_KEYS``). A composed config (login node) is converted with
``launcher.config.to_typed`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Type, TypeVar

from launcher.config.schema import LauncherConfig
from launcher.rundir import CONFIG_FILE

# Dotted keys that config.yaml files of older launchers may hold and the schema no longer has.
RETIRED_KEYS = ("strategy.zero_stage",)

S = TypeVar("S")


def drop_retired(tree: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``tree`` without ``RETIRED_KEYS`` (the dicts on each key's path are copied, the rest shared)."""
    out = dict(tree)
    for dotted in RETIRED_KEYS:
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            child = node.get(key)
            if not isinstance(child, Mapping):
                break
            copied = dict(child)
            node[key] = copied
            node = copied
        else:
            node.pop(leaf, None)
    return out


def from_plain(tree: Mapping[str, Any]) -> LauncherConfig:
    """A plain config tree (e.g. a saved config.yaml) merged into the schema: schema types, defaults for absent keys.

    Raises omegaconf's ``ValidationError`` / ``ConfigKeyError`` on a value of the wrong type or an unknown key.
    """
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(LauncherConfig), drop_retired(tree))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def read_run_config(run_dir: str | Path) -> LauncherConfig:
    """``<run_dir>/config.yaml`` (written by the launcher before the job starts) as ``LauncherConfig``."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resolved config (the launcher writes it before starting the job)")
    return from_plain(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def section(value: Any, cls: Type[S]) -> S:
    """One schema section (``ModelConfig``, ``PeftConfig``, ...): a dataclass as it is, a mapping (tests and tools that
    hold plain YAML values) merged into ``cls``."""
    if isinstance(value, cls):
        return value
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), value))  # type: ignore[return-value]
