"""The scaling report over a sweep directory: ``scaling.csv``, ``scaling.md`` and two PNG plots.

    points.py     one run directory -> a Point (read the config, guess the devices, measure, bill, classify)
    logs.py       the failure reason from the tails of the newest job's logs
    sweep.py      the run directories of a sweep, efficiency per strategy, the scaling mode, the notes
    markdown.py   the markdown text
    metrics.py    the arithmetic (pure functions)
    plots.py      the PNGs (matplotlib, imported only here when plotting)

Login-node code: stdlib, PyYAML (an omegaconf dependency) and ``launcher.plan``; matplotlib only in ``plots``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from launcher.errors import UserError
from launcher.status.safe import inside, problem_of

from launcher.scaling import metrics as m
from launcher.scaling.markdown import render_markdown
from launcher.scaling.points import CSV_FIELDS, DEFAULT_WARMUP_STEPS, PROJECTION_FIELDS, Point
from launcher.scaling.sweep import MODES, collect_points, infer_mode


def write_csv(points: Sequence[Point], path: Path, tokens_target: Optional[float] = None,
              overhead: float = 0.0) -> Path:
    """One row per point (every ``Point`` field but the fingerprint), plus the projection with ``tokens_target``;
    written atomically."""
    columns = CSV_FIELDS + (PROJECTION_FIELDS if tokens_target else [])
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=columns)
    writer.writeheader()
    for p in points:
        row = {k: v for k, v in asdict(p).items() if k in CSV_FIELDS}
        if tokens_target and p.ok:
            proj = m.project(tokens_target, p, overhead=overhead)
            row.update(proj_wall_hours=proj["wall_hours"], proj_node_hours=proj["node_hours"],
                       proj_billing_units=proj["billing_units"])
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return write_atomic(path, handle.getvalue())


def write_atomic(path: Path, text: str) -> Path:
    """Write ``path`` through a new temporary file renamed over it: a symlink or FIFO already there is replaced,
    never written through, and a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "x", newline="", encoding="utf-8") as handle:
        handle.write(text)
    tmp.replace(path)
    return path


def _plots(points: Sequence[Point], out: Path, mode: str) -> Tuple[List[Path], Optional[str]]:
    """(the PNGs written, None), or ([], why) when matplotlib is missing (``plots`` imports it when drawing)."""
    try:
        from launcher.scaling import plots as plotting

        return [plotting.plot_throughput(points, out / "throughput.png"),
                plotting.plot_efficiency(points, out / "efficiency.png", mode=mode)], None
    except ImportError as exc:
        return [], f"no plots: {exc} (pip install matplotlib)"
    except (ValueError, OverflowError, ArithmeticError) as exc:  # values matplotlib cannot place on an axis
        return [], f"no plots: {type(exc).__name__}: {exc}"


def _out_dir(sweep_dir: Path, out_dir: Path | str | None) -> Path:
    """--out, or SWEEP_DIR/scaling (refused when it is a symlink leading out of the sweep); created."""
    out = Path(out_dir) if out_dir is not None else sweep_dir / "scaling"
    field = "--out" if out_dir is not None else "SWEEP_DIR/scaling"
    if out_dir is None and not inside(out, sweep_dir):
        raise UserError(field, str(out), "leads outside the sweep directory (a symlink?)",
                        "pass --out DIR to write the report there")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(field, str(out), problem_of(error), "a directory that can be created and written") from None
    if not os.access(out, os.W_OK):
        raise UserError(field, str(out), "not writable", "a directory that can be written")
    return out


def write_report(sweep_dir: Path | str, out_dir: Path | str | None = None, mode: str = "auto",
                 warmup_steps: int = DEFAULT_WARMUP_STEPS, tokens_target: Optional[float] = None,
                 overhead: float = 0.0) -> Dict[str, Any]:
    """Write ``scaling.csv``, ``scaling.md``, ``throughput.png`` and ``efficiency.png`` into ``out_dir``
    (default ``<sweep_dir>/scaling``).

    ``mode``: ``strong``, ``weak`` or ``auto`` (inferred from the batch sizes, see ``infer_mode``). Returns
    ``{"points", "mode", "markdown" (the text), "csv", "md", "plots" (paths), "plot_error"}``; the plots are skipped
    (``plot_error`` says why) when matplotlib is missing.
    """
    if mode not in MODES:
        raise UserError("--mode", mode, "not a scaling mode", f"one of {', '.join(MODES)}")
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        why = "does not exist" if not os.path.lexists(sweep_dir) else "not a directory"
        raise UserError("SWEEP_DIR", str(sweep_dir), why,
                        "a sweep's output directory (e.g. runs/) or one run directory")
    out = _out_dir(sweep_dir, out_dir)
    points = collect_points(sweep_dir, warmup_steps)
    resolved = infer_mode(points) if mode == "auto" else mode

    plots, plot_error = _plots(points, out, resolved)
    csv_path = write_csv(points, out / "scaling.csv", tokens_target, overhead)
    text = render_markdown(points, title=sweep_dir.resolve().name, mode=resolved, warmup_steps=warmup_steps,
                           tokens_target=tokens_target, overhead=overhead, plots=[str(p) for p in plots])
    md_path = write_atomic(out / "scaling.md", text)
    return {"points": points, "mode": resolved, "markdown": text, "csv": csv_path, "md": md_path,
            "plots": plots, "plot_error": plot_error}
