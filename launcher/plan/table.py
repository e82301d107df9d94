"""The plain-text strategy table of every dry run and of the gate's refusal: GiB per device, host GiB per node.

Imported on the login node: stdlib only. ``launcher.plan.memory.format_strategy_table`` calls ``format_strategy_table``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence

from launcher.plan.devices import Device
from launcher.plan.memory import StrategyFit, gib, recommend


def verdict(fit: StrategyFit) -> str:
    """``yes``, or ``no`` and what does not fit when host memory is planned (``no: device, host load``)."""
    if fit.host is None:
        return "yes" if fit.fits else "no"
    reasons = [] if fit.fits else ["device"]
    if not fit.host.load_fits:
        reasons.append("host load")
    if not fit.host.steady_fits:
        reasons.append("host training" if fit.host.on_cpu else "host offload")
    return "no: " + ", ".join(reasons) if reasons else "yes"


def _rows(fits: Sequence[StrategyFit], host: bool) -> List[tuple[str, ...]]:
    rows = []
    for fit in fits:
        e = fit.estimate
        cells = [fit.strategy, *(f"{e.gib(name):.2f}" for name in ("parameters", "gradients", "optimizer",
                                                                   "activations", "total"))]
        if host:
            cells.append(f"{gib(fit.host.peak):.2f}" if fit.host else "-")
        rows.append((*cells, verdict(fit)))
    return rows


def _grid(header: tuple[str, ...], rows: List[tuple[str, ...]]) -> List[str]:
    widths = [max(len(row[col]) for row in (header, *rows)) for col in range(len(header))]
    last = len(header) - 1

    def line(cells: Sequence[str]) -> str:
        # Names and verdicts left-aligned, numbers right-aligned so the decimals line up.
        padded = [c.ljust(w) if col in (0, last) else c.rjust(w) for col, (c, w) in enumerate(zip(cells, widths))]
        return " | ".join(padded).rstrip()

    return [line(header), "-+-".join("-" * w for w in widths), *(line(row) for row in rows)]


def _load_text(fit: StrategyFit) -> str:
    plan = fit.host
    assert plan is not None
    count = {"rank": f"{plan.ranks_per_node} x ", "node": "1 x ", "none": "0 x "}[plan.rule.copies]
    return f"{plan.rule.how}: {count}{gib(plan.copy):.2f} GiB = {gib(plan.load):.2f} GiB"


def host_lines(fits: Sequence[StrategyFit]) -> List[str]:
    """The host-memory lines below the table: the budget, the load rule(s), the offload, the low-memory what-if."""
    planned = [fit for fit in fits if fit.host is not None]
    if not planned:
        return []
    first = planned[0].host
    assert first is not None
    lines = [
        f"host per node: {first.ranks_per_node} ranks, {gib(first.budget):.2f} GiB for the job; host GiB/node ="
        f" max(load, offload) + {gib(first.allowance // first.ranks_per_node):.0f} GiB per rank (process, dataloader)"
    ]
    by_text: dict[str, List[str]] = {}
    for fit in planned:
        by_text.setdefault(_load_text(fit), []).append(fit.strategy)
    for text, names in by_text.items():
        who = "" if len(by_text) == 1 else f" ({', '.join(names)})"
        lines.append(f"host load{who}: {text}")
    offload = [f"{fit.strategy} {gib(fit.host.steady):.2f}" for fit in planned if fit.host and fit.host.steady]
    if offload:
        lines.append("host during training GiB/node (offloaded states x ranks + DeepSpeed's pinned buffers; on a CPU"
                     f" device all states): {', '.join(offload)}")
    lines += _low_memory_lines(planned)
    return lines


def _low_memory_lines(planned: Sequence[StrategyFit]) -> List[str]:
    """What low-memory loading (issue 15's job side) would change, shown while today's load does not fit."""
    if all(fit.host and fit.host.load_fits for fit in planned) or any(f.host_low_memory is None for f in planned):
        return []
    peaks = ", ".join(f"{fit.strategy} {gib(fit.host_low_memory.peak):.2f}" for fit in planned if fit.host_low_memory)
    fitting = [fit.strategy for fit in planned if fit.fits and fit.host_low_memory and fit.host_low_memory.fits]
    verdict_text = f"would fit: {', '.join(fitting)}" if fitting else "still none fits"
    return [f"with low-memory loading (issue 15, not in the job yet: one copy per node for zero3/fsdp, none on the"
            f" host for ddp/zero1/zero2): host GiB/node {peaks}; {verdict_text}"]


def recommendation(fits: Sequence[StrategyFit]) -> str:
    """The last line: the strategy to use, or why none fits and what would help."""
    choice = recommend(fits)
    if choice is not None:
        return f"recommendation: {choice} (least communication that fits)"
    on_device = [fit for fit in fits if fit.fits]
    if not on_device:
        return ("recommendation: none fits; use more devices, gradient checkpointing, a smaller micro batch or"
                " offloading")
    load = [fit for fit in on_device if fit.host and not fit.host.load_fits]
    if load:
        plan = load[0].host
        assert plan is not None
        more = " (every rank holds a full copy: more nodes do not help)" if plan.rule.copies == "rank" else ""
        later = low_memory_recommendation(fits)
        later_text = f"; with low-memory loading (issue 15) {later} would fit" if later else ""
        names = ", ".join(f.strategy for f in load) + (" fits" if len(load) == 1 else " fit")
        return (f"recommendation: none fits; {names} the device but the load needs"
                f" {gib(plan.load + plan.allowance):.2f} GiB of host memory per node, more than the job's"
                f" {gib(plan.budget):.2f} GiB{more}{later_text}")
    what = "the training states of its CPU ranks" if on_device[0].host and on_device[0].host.on_cpu else (
        "the offloaded states")
    return (f"recommendation: none fits; {what} do not fit the node's host memory: use more nodes (per-rank shards"
            " shrink with the world size), fewer ranks per node or offload less")


def format_strategy_table(fits: Sequence[StrategyFit], device: Device) -> str:
    """The table of ``plan_strategies`` output, the host lines when host memory was planned, the recommendation."""
    host = any(fit.host is not None for fit in fits)
    header = ("strategy", "params", "grads", "optimizer", "activations", "total GiB",
              *(("host GiB/node",) if host else ()), "fits")
    lines: List[str] = []
    if fits:
        world_size, margin = fits[0].estimate.world_size, fits[0].margin
        lines.append(
            f"device {device.name}: {gib(device.memory_bytes):.2f} GiB, usable {gib(fits[0].usable_bytes):.2f} GiB"
            f" (margin {margin:.2f}), world size {world_size}"
        )
    lines += _grid(header, _rows(fits, host))
    for note in dict.fromkeys(note for fit in fits for note in fit.estimate.notes):
        lines.append(f"note: {note}")
    lines += host_lines(fits)
    lines.append(recommendation(fits))
    return "\n".join(lines)


def low_memory_recommendation(fits: Sequence[StrategyFit]) -> Optional[str]:
    """The strategy ``recommend`` would pick under low-memory loading (None: none, or not planned)."""
    if any(fit.host_low_memory is None for fit in fits):
        return None
    return recommend([replace(fit, host=fit.host_low_memory) for fit in fits])
