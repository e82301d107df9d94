"""A sweep directory as points: which directories are points, the efficiency of each against its group, the scaling
mode the batches describe, and the notes a reader of the table should see.

A sweep directory (``runs/``) holds one run directory per point (``<run_name>__nodes=2+strategy=zero3``); a directory
given directly that holds ``config.yaml`` is a sweep of one point.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import List, Sequence

from launcher import rundir
from launcher.errors import UserError
from launcher.scaling import metrics as m
from launcher.scaling.points import DEFAULT_WARMUP_STEPS, Point, read_point, unreadable_point
from launcher.status.safe import problem_of

MODES = ("auto", "strong", "weak")
NOISY_SPREAD = 0.10  # p10-p90 step-time spread above which a point is flagged as noisy
FEW_MEASURED_STEPS = 20


def _has_config(path: Path) -> bool:
    """Whether ``path`` holds a config.yaml of any kind (a FIFO or a directory there is a point, shown unreadable)."""
    try:
        return os.path.lexists(path / rundir.CONFIG_FILE)
    except OSError:  # cannot even look inside: a point, shown as unreadable
        return True


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def run_dirs(sweep_dir: Path) -> List[Path]:
    """The points of a sweep: ``sweep_dir`` itself when it is a run directory, else its subdirectories with a config."""
    sweep_dir = Path(sweep_dir)
    if _has_config(sweep_dir):
        return [sweep_dir]
    try:
        entries = list(sweep_dir.iterdir())
    except OSError as error:
        raise UserError("SWEEP_DIR", str(sweep_dir), problem_of(error), "a readable directory of run directories")
    return sorted(p for p in entries if not p.name.startswith(".") and _is_dir(p) and _has_config(p))


def group_points(points: Sequence[Point]) -> "OrderedDict[str, List[Point]]":
    """Points by strategy (one line per strategy in the plots, one efficiency reference per strategy)."""
    groups: "OrderedDict[str, List[Point]]" = OrderedDict()
    for point in sorted(points, key=lambda p: (p.strategy, p.devices, p.name)):
        groups.setdefault(point.strategy, []).append(point)
    return groups


def collect_points(
    sweep_dir: Path | str, warmup_steps: int = DEFAULT_WARMUP_STEPS, mode: str = "strong"
) -> List[Point]:
    """Every point of the sweep, sorted by strategy then devices, with its scaling efficiency against the ok point
    with the fewest devices of the same strategy (``metrics.scaling_efficiency``; the value does not depend on
    ``mode``, see there). A point whose files cannot be read is a failed point; the others are still read."""
    if mode == "auto":
        mode = "strong"
    points = [_read_point_or_unreadable(d, warmup_steps) for d in run_dirs(Path(sweep_dir))]
    for group in group_points(points).values():
        ok = [p for p in group if p.ok]
        if ok:
            for point, eff in zip(ok, m.scaling_efficiency([(p.devices, p.tokens_per_s) for p in ok], mode)):
                point.efficiency = eff
    return [p for g in group_points(points).values() for p in g]


def _read_point_or_unreadable(run_dir: Path, warmup_steps: int) -> Point:
    """``read_point``, or a failed point saying that it could not be read: one bad point never stops the report."""
    try:
        return read_point(run_dir, warmup_steps)
    except Exception as error:  # noqa: BLE001 - a file no reader expected; the other points still come
        return unreadable_point(run_dir, "run directory", problem_of(error))


def infer_mode(points: Sequence[Point]) -> str:
    """``strong`` when the global batch is the same at every point of each strategy, ``weak`` when the per-device
    batch is, else ``strong`` (the report then warns)."""
    groups = [[p for p in g if p.global_batch_tokens] for g in group_points(points).values()]
    groups = [g for g in groups if len({p.devices for p in g}) > 1]
    if not groups:
        return "strong"
    if all(len({p.global_batch_tokens for p in g}) == 1 for g in groups):
        return "strong"
    if all(len({p.per_device_batch_tokens for p in g}) == 1 for g in groups):
        return "weak"
    return "strong"


def _tokens_list(values: set) -> str:
    return ", ".join(f"{b:,}" for b in sorted(values))


def _group_notes(strategy: str, group: Sequence[Point], mode: str) -> List[str]:
    """Notes on one strategy's points: the batch the mode fixes varies, duplicate device counts, failed smaller ones."""
    notes: List[str] = []
    batches = {p.global_batch_tokens for p in group if p.global_batch_tokens}
    per_device = {p.per_device_batch_tokens for p in group if p.per_device_batch_tokens}
    if mode == "strong" and len(batches) > 1:
        notes.append(f"{strategy}: strong scaling asks for a fixed global batch, but it varies "
                     f"({_tokens_list(batches)} tokens per step): "
                     "adjust train.grad_accum or train.micro_batch_size per node count, or use --mode weak.")
    if mode == "weak" and len(per_device) > 1:
        notes.append(f"{strategy}: weak scaling asks for a fixed per-device batch, but it varies "
                     f"({_tokens_list(per_device)} tokens per device per step).")
    ok = [p for p in group if p.ok]
    dup = sorted(d for d, n in Counter(p.devices for p in ok).items() if n > 1)
    if dup:
        notes.append(f"{strategy}: several ok points with {', '.join(map(str, dup))} devices: the sweep varies "
                     "something besides nodes and strategy; efficiencies mix them.")
    if any(not p.ok and ok and p.devices < ok[0].devices for p in group):
        notes.append(f"{strategy}: the reference point is {ok[0].devices} devices; smaller points failed.")
    return notes


def checks(points: Sequence[Point], mode: str) -> List[str]:
    """What a reader of the table should know: the sweep does not hold what the mode says, noisy points, etc."""
    notes = [note for strategy, group in group_points(points).items() for note in _group_notes(strategy, group, mode)]
    noisy = [p.name for p in points if p.ok and p.spread is not None and p.spread > NOISY_SPREAD]
    if noisy:
        notes.append(f"step-time spread (p10-p90) above {NOISY_SPREAD:.0%} in: {', '.join(noisy)}; "
                     "run more steps or check for a slow node.")
    few = [p.name for p in points if p.ok and p.measured_steps < FEW_MEASURED_STEPS]
    if few:
        notes.append(f"fewer than {FEW_MEASURED_STEPS} measured steps in: {', '.join(few)}.")
    return notes + [f"{p.name}: {warning}" for p in points for warning in p.warnings]
