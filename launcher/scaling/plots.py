"""PNG plots of a scaling report: throughput against devices (with the ideal line) and efficiency against devices.

matplotlib is imported inside the functions and drawn with its Agg canvas directly (no pyplot, no global backend
switch), so this works on a login node without a display and does not disturb an interactive session.
One line per strategy; failed points are red crosses on the bottom axis at their device count (a point whose config
could not be read has none: it is only in the table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple

from launcher.scaling.points import Point
from launcher.scaling.sweep import group_points

DPI = 120
SIZE = (6.4, 4.4)


def _figure() -> Tuple[Any, Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    return fig, canvas, ax


def _device_ticks(ax: Any, devices: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ticks = sorted({d for d in devices if d > 0})
    if not ticks:
        return
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
    else:
        ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)


def _failed_markers(ax: Any, points: Sequence[Point]) -> None:
    from matplotlib.transforms import blended_transform_factory

    failed = [p for p in points if not p.ok and p.devices > 0]  # an unreadable point has no device count
    if not failed:
        return
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    ax.scatter([p.devices for p in failed], [0.03] * len(failed), marker="x", s=60, color="tab:red",
               transform=transform, clip_on=False, zorder=5, label="failed (see table)")


def _save(fig: Any, canvas: Any, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    tmp.unlink(missing_ok=True)  # a stale file, or a symlink or FIFO left there: never written through
    canvas.print_png(str(tmp))
    tmp.replace(path)
    return path


def plot_throughput(points: Sequence[Point], path: Path | str, title: str = "Throughput") -> Path:
    """tokens/s against devices, log-log, measured (solid, markers) and ideal linear scaling from the smallest ok
    point of each strategy (dashed, same colour)."""
    fig, canvas, ax = _figure()
    colours = [c["color"] for c in __import__("matplotlib").rcParams["axes.prop_cycle"]]
    drew = False
    for i, (strategy, group) in enumerate(group_points(points).items()):
        ok = [p for p in group if p.ok]
        if not ok:
            continue
        colour = colours[i % len(colours)]
        xs = [p.devices for p in ok]
        ys = [p.tokens_per_s for p in ok]
        ax.plot(xs, ys, marker="o", color=colour, label=f"{strategy} measured")
        ref = ok[0]
        ideal_x = sorted({ref.devices, *xs, *(p.devices for p in group)})
        ax.plot(ideal_x, [ref.tokens_per_s * d / ref.devices for d in ideal_x], linestyle="--", color=colour,
                alpha=0.7, label=f"{strategy} ideal")
        drew = True
    _device_ticks(ax, [p.devices for p in points])
    if drew:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no successful point", transform=ax.transAxes, ha="center", va="center")
    _failed_markers(ax, points)
    ax.set_xlabel("devices (GPUs / GCDs)")
    ax.set_ylabel("tokens / s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if points:
        ax.legend(fontsize="small")
    return _save(fig, canvas, Path(path))


def plot_efficiency(points: Sequence[Point], path: Path | str, mode: str = "strong",
                    title: str | None = None) -> Path:
    """Scaling efficiency (percent) against devices, one line per strategy, with the 100 % line."""
    fig, canvas, ax = _figure()
    colours = [c["color"] for c in __import__("matplotlib").rcParams["axes.prop_cycle"]]
    top: List[float] = [100.0]
    for i, (strategy, group) in enumerate(group_points(points).items()):
        ok = [p for p in group if p.ok and p.efficiency is not None]
        if not ok:
            continue
        ys = [100 * p.efficiency for p in ok]
        top += ys
        ax.plot([p.devices for p in ok], ys, marker="o", color=colours[i % len(colours)], label=strategy)
    ax.axhline(100, color="grey", linestyle="--", linewidth=1, label="ideal")
    _device_ticks(ax, [p.devices for p in points])
    ax.set_ylim(0, max(110.0, max(top) * 1.05))
    _failed_markers(ax, points)
    ax.set_xlabel("devices (GPUs / GCDs)")
    ax.set_ylabel(f"{mode} scaling efficiency (%)")
    ax.set_title(title or f"{mode.capitalize()} scaling efficiency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, canvas, Path(path))
