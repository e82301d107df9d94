"""The scaling report as markdown: the header paragraph, the table, the projection, the notes and the plot links.

Numbers are written to about 3 significant digits; failed points stay in the table with their reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from launcher import rundir
from launcher.cli_errors import clean
from launcher.plan.devices import DEVICES
from launcher.scaling import metrics as m
from launcher.scaling.points import Point
from launcher.scaling.sweep import checks
from launcher.plan.billing import UNIT_NAMES

FINGERPRINT_FIELDS = (
    ("commit", lambda fp: str(fp.get("git_commit") or "")[:10] + (" (dirty)" if fp.get("git_dirty") else "") or None),
    ("container", lambda fp: fp.get("container_image")),
    ("image digest", lambda fp: _short_digest(fp.get("container_digest"))),
    ("torch", lambda fp: fp.get("torch")),
    ("HIP", lambda fp: fp.get("hip")),
    ("CUDA", lambda fp: fp.get("cuda")),
    ("NCCL/RCCL", lambda fp: fp.get("nccl")),
    ("DeepSpeed", lambda fp: fp.get("deepspeed")),
    ("transformers", lambda fp: fp.get("transformers")),
    ("python", lambda fp: fp.get("python")),
)


def _short_digest(digest: Optional[str]) -> Optional[str]:
    if not digest:
        return None
    parts = str(digest).split(":")
    return f"{parts[0]}:{parts[1][:12]}" if len(parts) >= 2 else digest[:24]


def fingerprint_summary(points: Sequence[Point]) -> Tuple[str, List[str]]:
    """(one-line summary, list of differences across points)."""
    fps = [p.fingerprint for p in points if p.fingerprint]
    if not fps:
        return f"no {rundir.FINGERPRINT_FILE} in any point (the job did not write a fingerprint)", []
    parts, diffs = [], []
    for label, getter in FINGERPRINT_FIELDS:
        values = Counter(str(v) for v in (getter(fp) for fp in fps) if v)
        if not values:
            continue
        if len(values) == 1:
            parts.append(f"{label} {next(iter(values))}")
        else:
            parts.append(f"{label} differs")
            diffs.append(f"{label} differs across points: " + "; ".join(f"{v} ({n})" for v, n in values.most_common()))
    missing = len(points) - len(fps)
    if missing:
        parts.append(f"no {rundir.FINGERPRINT_FILE} in {missing} of {len(points)} points")
    return ", ".join(parts), diffs


def _num(value: Optional[float]) -> str:
    """About 3 significant digits, thousands separated: 41,200 / 412 / 41.2 / 6.74 / 0.0123."""
    if value is None:
        return "-"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return "0" if value == 0 else f"{value:.3g}"


def _pct(value: Optional[float], decimals: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{decimals}f} %"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _unit_name(unit: Optional[str]) -> str:
    return UNIT_NAMES.get(unit or "", unit or "billing units")


def markdown_table(points: Sequence[Point]) -> str:
    """One row per point; a failed point shows its reason in the Status column."""
    units = {p.billing_unit for p in points if p.billing_unit}
    unit_header = _unit_name(next(iter(units))) if len(units) == 1 else "Billing units"
    header = ["Strategy", "Nodes", "Devices", "Tokens/s", "Tokens/s/device", "MFU", "Efficiency",
              "Step time (s)", "Peak mem (GB)", "Node-hours / 1B tok", f"{unit_header} / 1B tok", "Status"]
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 10 + ["---"]) + "|"]
    for p in points:
        if p.ok:
            step = "-" if p.step_time is None else _num(p.step_time) + (
                f" (±{100 * p.spread / 2:.1f} %)" if p.spread is not None else "")
            billing = _num(p.billing_per_btok) + ("" if len(units) <= 1 or not p.billing_unit
                                                  else f" {_unit_name(p.billing_unit)}")
            cells = [p.strategy, str(p.nodes), str(p.devices), _num(p.tokens_per_s), _num(p.per_device),
                     _pct(p.mfu), _pct(p.efficiency, 0), step, _num(p.peak_mem_gb), _num(p.node_hours_per_btok),
                     billing, "ok"]
        else:
            cells = [p.strategy, str(p.nodes), str(p.devices)] + ["-"] * 5 + [_num(p.peak_mem_gb), "-", "-",
                                                                              f"**failed** ({p.name}): {p.reason}"]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def _device_description(device: str) -> str:
    return (DEVICES[device].description or device) if device in DEVICES else device


def _setup_sentence(points: Sequence[Point]) -> str:
    """Model, strategies, cluster, device, the peak and the FLOPs per token MFU is computed with."""
    first = next((p for p in points if p.ok), points[0])
    strategies = ", ".join(sorted({p.strategy for p in points}))
    model_text = ", ".join(sorted({p.model for p in points if p.model})) or "?"
    if first.n_params:
        model_text += f" ({first.n_params / 1e9:.2f} B parameters)"
    device = _device_description(first.device) or "device unknown"
    peak = f"{first.peak_tflops:g} TFLOP/s bf16 dense per device" if first.peak_tflops else "no known peak"
    cluster = first.cluster + (f" {first.partition}" if first.partition else "")
    flops = (f", {first.flops_per_token / 1e9:.3g} GFLOP per token = 6N + 12LHS at sequence length {first.seq_len}"
             if first.flops_per_token else "")
    return f"Model **{model_text}**, strategy **{strategies}**, on **{cluster}** ({device}; MFU against {peak}{flops})."


def _mode_sentence(points: Sequence[Point], mode: str) -> str:
    """What the sweep held fixed and the efficiency formula of the mode."""
    if mode == "strong":
        batches = sorted({p.global_batch_tokens for p in points if p.global_batch_tokens})
        what = f"global batch fixed at {batches[0]:,} tokens per step" if len(batches) == 1 else "global batch fixed"
        return f"**Strong scaling** ({what}): efficiency = (T_n / T_ref) / (D_n / D_ref)."
    per_device = sorted({p.per_device_batch_tokens for p in points if p.per_device_batch_tokens})
    what = (f"per-device batch fixed at {per_device[0]:,} tokens per step" if len(per_device) == 1
            else "per-device batch fixed")
    return f"**Weak scaling** ({what}): efficiency = (T_n / D_n) / (T_ref / D_ref)."


def _header_paragraph(points: Sequence[Point], mode: str, warmup_steps: int) -> List[str]:
    definitions = (
        "T is the median of rank 0's logged tokens/s over the measured steps "
        f"(the first {warmup_steps} steps are warm-up and excluded), D the number of devices, the reference the "
        "point with the fewest devices of the same strategy; step time is the median with half the p10-p90 spread; "
        "peak memory is rank 0's. Node-hours / 1B tok = nodes x 10^9 / T / 3600."
    )
    summary, _ = fingerprint_summary(points)
    return [_setup_sentence(points), _mode_sentence(points, mode), definitions, f"Environment: {summary}."]


def projection_table(points: Sequence[Point], tokens_target: float, overhead: float = 0.0) -> str:
    """Wall-clock, node-hours and billing units of ``tokens_target`` tokens at each measured point."""
    ok = [p for p in points if p.ok]
    units = {p.billing_unit for p in ok if p.billing_unit}
    unit_header = _unit_name(next(iter(units))) if len(units) == 1 else "Billing units"
    rows = [f"| Strategy | Nodes | Devices | Wall-clock (days) | Node-hours | {unit_header} |",
            "|---|---:|---:|---:|---:|---:|"]
    for p in ok:
        proj = m.project(tokens_target, p, overhead=overhead)
        rows.append(f"| {p.strategy} | {p.nodes} | {p.devices} | {_num(proj['wall_hours'] / 24)} | "
                    f"{_num(proj['node_hours'])} | {_num(proj['billing_units'])} |")
    return "\n".join(rows)


def _projection_section(points: Sequence[Point], tokens_target: float, overhead: float) -> List[str]:
    allowance = (f" (+{overhead:.0%} for checkpoints, evaluation and restarts)" if overhead else
                 " (no allowance for checkpoints, evaluation or restarts)")
    intro = (f"**Projection** for {tokens_target / 1e9:,.4g} billion training tokens{allowance}: wall-clock = tokens "
             "/ T, node-hours = wall-clock x nodes, billing = node-hours x the partition's rate, assuming the "
             "measured throughput holds for the whole run.")
    table = (projection_table(points, tokens_target, overhead) if any(p.ok for p in points)
             else "No measured point to project from.")
    return [intro, "", table, ""]


def render_markdown(points: Sequence[Point], *, title: str, mode: str, warmup_steps: int,
                    tokens_target: Optional[float] = None, overhead: float = 0.0, plots: Sequence[str] = ()) -> str:
    """The whole report: header paragraph, table, projection (with ``tokens_target``), notes, plot links; without
    terminal control characters (names, reasons and log lines come from the run directories)."""
    return clean(_render(points, title=title, mode=mode, warmup_steps=warmup_steps, tokens_target=tokens_target,
                         overhead=overhead, plots=plots), keep_newlines=True)


def _render(points: Sequence[Point], *, title: str, mode: str, warmup_steps: int,
            tokens_target: Optional[float], overhead: float, plots: Sequence[str]) -> str:
    out = [f"## Scaling: {title}", ""]
    if not points:
        return "\n".join(out + [f"No run directories (with {rundir.CONFIG_FILE}) found.", ""])
    out += [" ".join(_header_paragraph(points, mode, warmup_steps)), "", markdown_table(points), ""]
    if tokens_target:
        out += _projection_section(points, tokens_target, overhead)
    _, diffs = fingerprint_summary(points)
    notes = checks(points, mode) + diffs
    if notes:
        out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    out += [f"![{Path(plot).stem}]({Path(plot).name})" for plot in plots] + ([""] if plots else [])
    return "\n".join(out)
