"""Hydra multirun (-m): every point of a sweep gets its own, deterministic run directory."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Sequence

_SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "tag(", "shuffle(", "sort(")


def swept_keys(argv: Iterable[str]) -> List[str]:
    """Keys the command line sweeps over: 'a=1,2', 'b=range(1,3)', 'c=choice(x,y)'."""
    keys = []
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        if value.startswith(_SWEEP_FUNCTIONS) or _has_top_level_comma(value):
            keys.append(key.lstrip("+~"))
    return keys


def _has_top_level_comma(value: str) -> bool:
    depth, quote = 0, ""
    for char in value:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            return True
    return False


def point_suffix(task_overrides: Sequence[str], keys: Sequence[str]) -> str:
    """'nodes=2,strategy=zero3' for the swept keys of this point, safe as part of a directory name."""
    chosen = [o.lstrip("+~") for o in task_overrides if o.lstrip("+~").split("=", 1)[0] in keys]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(sorted(chosen)))


def name_sweep_point(cfg: Dict[str, Any], argv: Sequence[str], task_overrides: Sequence[str]) -> Dict[str, Any]:
    """The point's config with run_name extended by its swept values, unless run_name itself is swept."""
    keys = [k for k in swept_keys(argv) if k != "run_name"]
    if not keys or "run_name" in swept_keys(argv):
        return cfg
    return {**cfg, "run_name": f"{cfg['run_name']}__{point_suffix(task_overrides, keys)}"}
