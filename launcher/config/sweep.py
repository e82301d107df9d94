"""Hydra multirun (-m): every point of a sweep gets its own, deterministic run directory."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Sequence

from hydra.experimental.callback import Callback

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
    """'nodes=2+strategy=zero3' for the swept keys of this point, safe as part of a directory name (no commas or
    colons: a container bind list could not carry them)."""
    chosen = [o.lstrip("+~") for o in task_overrides if o.lstrip("+~").split("=", 1)[0] in keys]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "+".join(sorted(chosen)))


def name_sweep_point(cfg: Dict[str, Any], argv: Sequence[str], task_overrides: Sequence[str]) -> Dict[str, Any]:
    """The point's config with run_name extended by its swept values, unless run_name itself is swept."""
    keys = [k for k in swept_keys(argv) if k != "run_name"]
    if not keys or "run_name" in swept_keys(argv):
        return cfg
    return {**cfg, "run_name": f"{cfg['run_name']}__{point_suffix(task_overrides, keys)}"}


def sweep_points(argv: Sequence[str]) -> List[List[str]]:
    """The override list of every point a ``-m`` command line sweeps over, in Hydra's own order (its basic sweeper's
    cartesian product), so that every point can be checked before the first one runs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [arg for arg in argv if not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra.")]
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [point for batch in BasicSweeper.split_arguments(overrides, None) for point in batch]


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): one line per point at the end of a -m sweep."""

    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            self.rows.append(job_return.return_value)
        else:
            self.rows.append({"action": "failed", "run_dir": "-", "job_id": None})

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.rows:
            return
        print(f"\nlauncher: sweep of {len(self.rows)} points")
        for index, row in enumerate(self.rows):
            job = f"job {row['job_id']}" if row.get("job_id") else row["action"]
            print(f"  #{index:<3} {job:<18} {row['run_dir']}")
        submitted = [row["job_id"] for row in self.rows if row.get("job_id")]
        if submitted:
            print(f"  follow them: python -m launcher.status {self.rows[0]['run_dir'].rsplit('/', 1)[0]}")
