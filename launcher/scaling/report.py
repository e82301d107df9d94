"""The scaling report over a sweep directory: points, CSV, proposal-ready markdown and PNG plots.

A sweep directory (``runs/``) holds one run directory per point (``<run_name>__nodes=2+strategy=zero3``), each with
``config.yaml`` (written by the launcher), ``metrics.jsonl`` (rank 0's training lines), ``environment.json`` (the
fingerprint, ``launcher.scaling.fingerprint``), ``slurm/<jobid>_<task>_log.{out,err}`` (submitit's logs) and
``export/`` once training finished. A directory given directly that holds ``config.yaml`` is a sweep of one point.

A point is **failed** when its metrics are missing or hold no training line, when it did not complete (its largest
logged step is below ``train.max_steps`` and there is no ``export/``), or when no step was logged after the warm-up.
The reason comes from the tail of the newest job's logs (first known pattern that matches: out of memory, time limit,
cancelled, the last line of a Python traceback, NCCL error), else a description of what is missing.

Login-node code: stdlib, PyYAML (an omegaconf dependency) and ``launcher.plan``; matplotlib only in ``plots``.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from launcher.scaling import metrics as m
from launcher.scaling.fingerprint import read_fingerprint

DEFAULT_WARMUP_STEPS = 10
MODES = ("auto", "strong", "weak")
UNIT_NAMES = {"gpu_hours": "GPU-hours", "node_hours": "node-hours", "core_hours": "core-hours"}
LOG_TAIL_BYTES = 64 * 1024
REASON_MAX_CHARS = 200
NOISY_SPREAD = 0.10  # p10-p90 step-time spread above which a point is flagged as noisy
FEW_MEASURED_STEPS = 20

# (label, pattern) in priority order: the first pattern that matches any log line gives the reason.
_TRACEBACK = "traceback"
LOG_PATTERNS: Tuple[Tuple[str, Optional[re.Pattern]], ...] = (
    ("out of memory", re.compile(r"out of memory|OutOfMemoryError|oom[-_]kill", re.IGNORECASE)),
    ("time limit", re.compile(r"DUE TO TIME LIMIT")),
    # The training's own error line names the key or file at fault: better than the traceback that follows it.
    ("error", re.compile(r"^train: .*\berror: ")),
    # A cancelled job, not a step cancelled by srun --kill-on-bad-exit after another rank failed.
    ("cancelled", re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED")),
    (_TRACEBACK, None),
    ("NCCL error", re.compile(r"NCCL error|NCCL WARN|nccl(Internal|System|Unhandled\w*|Remote)Error|DistBackendError"
                              r"|collective operation timeout", re.IGNORECASE)),
)


@dataclass
class Point:
    """One run of the sweep, measured (status ``ok``) or not (``failed``, with ``reason``)."""

    name: str
    run_dir: str
    nodes: int
    devices: int
    strategy: str
    status: str = "ok"
    reason: str = ""
    tokens_per_s: Optional[float] = None
    per_device: Optional[float] = None  # tokens/s per device
    mfu: Optional[float] = None  # fraction
    mfu_source: str = ""  # "logged" (median of the job's mfu) or "computed" (6N + 12LHS against the peak)
    step_time: Optional[float] = None  # median seconds per step
    step_time_p10: Optional[float] = None
    step_time_p90: Optional[float] = None
    step_time_std: Optional[float] = None
    spread: Optional[float] = None  # (p90 - p10) / median of the step time
    peak_mem_gb: Optional[float] = None
    efficiency: Optional[float] = None  # against the smallest ok point of the same strategy
    node_hours_per_btok: Optional[float] = None
    billing_per_btok: Optional[float] = None
    billing_unit: Optional[str] = None
    billing_per_node_hour: Optional[float] = None
    measured_steps: int = 0
    logged_steps: int = 0
    last_step: int = 0
    max_steps: Optional[int] = None
    micro_batch_size: Optional[int] = None
    grad_accum: Optional[int] = None
    seq_len: Optional[int] = None
    global_batch_tokens: Optional[int] = None  # micro x accum x devices x seq_len
    flops_per_token: Optional[float] = None
    peak_tflops: Optional[float] = None
    model: str = ""
    n_params: Optional[int] = None
    cluster: str = "local"
    partition: str = ""
    device: str = ""
    job_id: str = ""
    nodelist: str = ""
    git_commit: str = ""
    fingerprint: Optional[Dict[str, Any]] = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def per_device_batch_tokens(self) -> Optional[int]:
        if None in (self.micro_batch_size, self.grad_accum, self.seq_len):
            return None
        return int(self.micro_batch_size) * int(self.grad_accum) * int(self.seq_len)


CSV_FIELDS = [f.name for f in fields(Point) if f.name != "fingerprint"]
PROJECTION_FIELDS = ["proj_wall_hours", "proj_node_hours", "proj_billing_units"]


# ---------------------------------------------------------------------------------------------------------------------
# Reading one run directory
# ---------------------------------------------------------------------------------------------------------------------
def _load_yaml(path: Path) -> Dict[str, Any]:
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except ImportError:  # PyYAML comes with omegaconf; this is only a fallback
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a mapping")
    return data


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The JSON lines of ``metrics.jsonl``; lines cut by a crash or not objects are skipped."""
    records: List[Dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        return []
    return records


def run_dirs(sweep_dir: Path) -> List[Path]:
    """The points of a sweep: ``sweep_dir`` itself when it is a run directory, else its subdirectories with a config."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "config.yaml").is_file():
        return [sweep_dir]
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / "config.yaml").is_file())


def _tail(path: Path, n_bytes: int = LOG_TAIL_BYTES) -> List[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - n_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = text.splitlines()
    return lines[1:] if size > n_bytes else lines  # the first line may be cut


_LOG_NAME = re.compile(r"^(?P<job>.+)_(?P<task>\d+)_log\.(?P<ext>out|err)$")
_ATTEMPT_LOG = re.compile(r"^attempt-(\d+)\.log$")


def latest_logs(run_dir: Path) -> List[Path]:
    """Logs of the newest job: submitit's ``slurm/<jobid>_<task>_log.{out,err}`` (task 0 first, .out before .err;
    an array job's id is ``<arrayid>_<index>``), then rank 0's newest ``logs/attempt-<N>.log`` (launcher.slurm.task)."""
    run_dir = Path(run_dir)
    found: List[Path] = []
    folder = run_dir / "slurm"
    if folder.is_dir():
        jobs: Dict[str, List[Tuple[int, int, Path]]] = {}
        for path in folder.iterdir():
            match = _LOG_NAME.match(path.name)
            if match and path.is_file():
                jobs.setdefault(match["job"], []).append((int(match["task"]), match["ext"] == "err", path))
        if jobs:
            newest = max(jobs.values(), key=lambda entries: max(p.stat().st_mtime for _, _, p in entries))
            found += [path for _, _, path in sorted(newest)]
    attempts = [(int(m[1]), p) for p in (run_dir / "logs").glob("attempt-*.log") if (m := _ATTEMPT_LOG.match(p.name))]
    if attempts:
        found.append(max(attempts)[1])
    return found


def _traceback_line(lines: Sequence[str]) -> Optional[str]:
    """The exception line of the last Python traceback in ``lines`` (first unindented line after the header)."""
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        if line.strip() and not line[:1].isspace():
            return line.strip()
    return None


def failure_reason(run_dir: Path) -> Optional[str]:
    """Why the newest job of ``run_dir`` failed, from its log tails; None when no known pattern matches."""
    tails = [_tail(path) for path in latest_logs(run_dir)]
    for label, pattern in LOG_PATTERNS:
        for lines in tails:
            if pattern is None:
                found = _traceback_line(lines)
                if found:
                    return _clip(found)
                continue
            matches = [line.strip() for line in lines if pattern.search(line)]
            if matches:
                return _clip(f"{label}: {matches[-1]}")
    return None


def _last_log_line(run_dir: Path) -> Optional[str]:
    for path in latest_logs(run_dir):
        lines = [line.strip() for line in _tail(path) if line.strip()]
        if lines:
            return lines[-1]
    return None


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 3] + "..."


def _model_numbers(model: Mapping[str, Any], seq_len: Optional[int]) -> Tuple[Optional[int], Optional[float]]:
    """(all parameters, 6N + 12LHS FLOPs per token) of a Llama-style model built from the config numbers."""
    from launcher.plan.fit import model_shape
    from launcher.plan.flops import flops_for_shape

    try:
        shape = model_shape(model)
    except (ValueError, KeyError, TypeError):  # numbers the planner cannot use: MFU comes from the job's own log
        return None, None
    return shape.n_params(), flops_for_shape(shape, int(seq_len)) if seq_len else None


def _device_description(device: Optional[str]) -> str:
    from launcher.plan.devices import DEVICES

    return DEVICES[device].description or device if device in DEVICES else (device or "")


def _peak_tflops(device: Optional[str]) -> Optional[float]:
    if not device:
        return None
    from launcher.plan.devices import DEVICES

    return float(DEVICES[device].peak_bf16_tflops) if device in DEVICES else None


def _tasks_per_node(cluster: Mapping[str, Any]) -> int:
    gpus = cluster.get("gpus_per_node_requested")
    gpus = cluster.get("gpus_per_node", 0) if gpus is None else gpus
    tasks = cluster.get("tasks_per_node")
    return int(tasks) if tasks is not None else max(1, int(gpus or 0))


def read_point(run_dir: Path, warmup_steps: int = DEFAULT_WARMUP_STEPS) -> Point:
    """One run directory as a ``Point`` (efficiency is filled in by ``collect_points``, against its group)."""
    run_dir = Path(run_dir)
    try:
        cfg = _load_yaml(run_dir / "config.yaml")
    except Exception as exc:
        return Point(name=run_dir.name, run_dir=str(run_dir), nodes=0, devices=0, strategy="?", status="failed",
                     reason=_clip(f"config.yaml unreadable: {exc}"))
    cluster = cfg.get("cluster") or None
    train = cfg.get("train") or {}
    model = cfg.get("model") or {}
    strategy = (cfg.get("strategy") or {}).get("name") or "?"
    nodes = int(cfg.get("nodes") or 1) if cluster else 1
    records = read_metrics(run_dir / "metrics.jsonl")
    fingerprint = read_fingerprint(run_dir)

    # Devices: what the job saw first (logged world_size, the fingerprint, tokens/s over tokens/s per device), else
    # what the config asked for.
    train_records = [r for r in records if m.is_train_record(r)]
    devices: Optional[int] = None
    for record in reversed(train_records):
        if isinstance(record.get("world_size"), int) and record["world_size"] > 0:
            devices = record["world_size"]
            break
    if devices is None and fingerprint and isinstance(fingerprint.get("world_size"), int):
        devices = fingerprint["world_size"]
    if devices is None:
        for record in train_records:
            per_device = record.get("tokens_per_s_per_device")
            if isinstance(per_device, (int, float)) and per_device > 0:
                devices = max(1, round(record["tokens_per_s"] / per_device))
                break
    if devices is None:
        devices = nodes * _tasks_per_node(cluster) if cluster else int(cfg.get("nproc_per_node") or 1)

    seq_len = train.get("seq_len")
    micro, accum = train.get("micro_batch_size"), train.get("grad_accum")
    global_batch = int(micro) * int(accum) * devices * int(seq_len) if None not in (micro, accum, seq_len) else None
    n_params, flops_per_token = _model_numbers(model, seq_len)
    device_name = (cluster or {}).get("device") or ""
    peak = _peak_tflops(device_name)
    rate = m.billing_rate_per_node_hour(cluster)
    point = Point(
        name=run_dir.name, run_dir=str(run_dir), nodes=nodes, devices=devices, strategy=str(strategy),
        max_steps=train.get("max_steps"), micro_batch_size=micro, grad_accum=accum, seq_len=seq_len,
        global_batch_tokens=global_batch, flops_per_token=flops_per_token, peak_tflops=peak,
        model=str(model.get("name") or ""), n_params=n_params, cluster=(cluster or {}).get("name") or "local",
        partition=str((cluster or {}).get("partition") or ""),
        device=device_name, billing_unit=(cluster or {}).get("billing_unit"), billing_per_node_hour=rate,
        fingerprint=fingerprint,
    )
    if fingerprint:
        point.job_id = str(fingerprint.get("job_id") or "")
        point.nodelist = str(fingerprint.get("nodelist") or "")
        point.git_commit = str(fingerprint.get("git_commit") or "")

    stats = m.throughput_stats(records, warmup_steps, tokens_per_step=global_batch)
    point.logged_steps, point.last_step, point.measured_steps = (
        stats["logged_steps"], stats["last_step"], stats["measured_steps"])
    point.peak_mem_gb = stats["peak_mem_gb"]
    finished = (run_dir / "export").is_dir() or (point.max_steps is not None and point.last_step >= point.max_steps)

    def fail(default: str) -> Point:
        point.status = "failed"
        reason = failure_reason(run_dir)
        if reason is None:
            last = _last_log_line(run_dir)
            reason = default + (f"; log ends: {last}" if last else "")
        point.reason = _clip(reason)
        return point

    if not train_records:
        return fail("no metrics" if (run_dir / "metrics.jsonl").exists() else "no metrics (no metrics.jsonl)")
    if not finished:
        return fail(f"incomplete: last logged step {point.last_step} of {point.max_steps}, no export/ "
                    "(still running?)")
    if stats["measured_steps"] == 0:
        point.status = "failed"
        point.reason = (f"no steps after warm-up: last step {point.last_step}, --warmup-steps {warmup_steps}; "
                        "run more steps or lower --warmup-steps")
        return point

    point.tokens_per_s = stats["tokens_per_s"]
    point.per_device = stats["tokens_per_s_per_device"] or point.tokens_per_s / devices
    point.step_time = stats["step_time_s"]
    point.step_time_p10, point.step_time_p90 = stats["step_time_p10_s"], stats["step_time_p90_s"]
    point.step_time_std, point.spread = stats["step_time_std_s"], stats["spread"]
    if stats["mfu"] is not None:
        point.mfu, point.mfu_source = stats["mfu"], "logged"
    elif flops_per_token and peak:
        point.mfu, point.mfu_source = m.mfu(point.tokens_per_s, flops_per_token, devices, peak), "computed"
    point.node_hours_per_btok = m.node_hours_per_billion_tokens(point.tokens_per_s, nodes)
    if rate is not None:
        point.billing_per_btok = m.billing_units_per_billion_tokens(point.tokens_per_s, nodes, rate)
    return point


# ---------------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------------
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
    ``mode``, see there)."""
    if mode == "auto":
        mode = "strong"
    points = [read_point(d, warmup_steps) for d in run_dirs(Path(sweep_dir))]
    for group in group_points(points).values():
        ok = [p for p in group if p.ok]
        if ok:
            for point, eff in zip(ok, m.scaling_efficiency([(p.devices, p.tokens_per_s) for p in ok], mode)):
                point.efficiency = eff
    return [p for g in group_points(points).values() for p in g]


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


def checks(points: Sequence[Point], mode: str) -> List[str]:
    """What a reader of the table should know: the sweep does not hold what the mode says, noisy points, etc."""
    notes: List[str] = []
    for strategy, group in group_points(points).items():
        batches = {p.global_batch_tokens for p in group if p.global_batch_tokens}
        per_device = {p.per_device_batch_tokens for p in group if p.per_device_batch_tokens}
        if mode == "strong" and len(batches) > 1:
            notes.append(f"{strategy}: strong scaling asks for a fixed global batch, but it varies "
                         f"({', '.join(f'{b:,}' for b in sorted(batches))} tokens per step): "
                         "adjust train.grad_accum or train.micro_batch_size per node count, or use --mode weak.")
        if mode == "weak" and len(per_device) > 1:
            notes.append(f"{strategy}: weak scaling asks for a fixed per-device batch, but it varies "
                         f"({', '.join(f'{b:,}' for b in sorted(per_device))} tokens per device per step).")
        counts = Counter(p.devices for p in group if p.ok)
        dup = sorted(d for d, n in counts.items() if n > 1)
        if dup:
            notes.append(f"{strategy}: several ok points with {', '.join(map(str, dup))} devices: the sweep varies "
                         "something besides nodes and strategy; efficiencies mix them.")
        ok = [p for p in group if p.ok]
        failed_smaller = [p for p in group if not p.ok and ok and p.devices < ok[0].devices]
        if failed_smaller:
            notes.append(f"{strategy}: the reference point is {ok[0].devices} devices; smaller points failed.")
    noisy = [p.name for p in points if p.ok and p.spread is not None and p.spread > NOISY_SPREAD]
    if noisy:
        notes.append(f"step-time spread (p10-p90) above {NOISY_SPREAD:.0%} in: {', '.join(noisy)}; "
                     "run more steps or check for a slow node.")
    few = [p.name for p in points if p.ok and p.measured_steps < FEW_MEASURED_STEPS]
    if few:
        notes.append(f"fewer than {FEW_MEASURED_STEPS} measured steps in: {', '.join(few)}.")
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprint summary
# ---------------------------------------------------------------------------------------------------------------------
FINGERPRINT_FIELDS = (
    ("commit", lambda fp: (fp.get("git_commit") or "")[:10] + (" (dirty)" if fp.get("git_dirty") else "") or None),
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
    parts = digest.split(":")
    return f"{parts[0]}:{parts[1][:12]}" if len(parts) >= 2 else digest[:24]


def fingerprint_summary(points: Sequence[Point]) -> Tuple[str, List[str]]:
    """(one-line summary, list of differences across points)."""
    fps = [p.fingerprint for p in points if p.fingerprint]
    if not fps:
        return "no environment.json in any point (the job did not write a fingerprint)", []
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
        parts.append(f"no environment.json in {missing} of {len(points)} points")
    return ", ".join(parts), diffs


# ---------------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------------
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


def _header_paragraph(points: Sequence[Point], mode: str, warmup_steps: int) -> List[str]:
    first = next((p for p in points if p.ok), points[0])
    strategies = sorted({p.strategy for p in points})
    models = sorted({p.model for p in points if p.model})
    model_text = ", ".join(models) or "?"
    if first.n_params:
        model_text += f" ({first.n_params / 1e9:.2f} B parameters)"
    device = _device_description(first.device) or "device unknown"
    peak = f"{first.peak_tflops:g} TFLOP/s bf16 dense per device" if first.peak_tflops else "no known peak"
    cluster = first.cluster + (f" {first.partition}" if first.partition else "")
    lines = [
        f"Model **{model_text}**, strategy **{', '.join(strategies)}**, on **{cluster}** ({device}; "
        f"MFU against {peak}"
        + (f", {first.flops_per_token / 1e9:.3g} GFLOP per token = 6N + 12LHS at sequence length {first.seq_len}"
           if first.flops_per_token else "")
        + ").",
    ]
    if mode == "strong":
        batches = sorted({p.global_batch_tokens for p in points if p.global_batch_tokens})
        what = f"global batch fixed at {batches[0]:,} tokens per step" if len(batches) == 1 else "global batch fixed"
        lines.append(f"**Strong scaling** ({what}): efficiency = (T_n / T_ref) / (D_n / D_ref).")
    else:
        per_device = sorted({p.per_device_batch_tokens for p in points if p.per_device_batch_tokens})
        what = (f"per-device batch fixed at {per_device[0]:,} tokens per step" if len(per_device) == 1
                else "per-device batch fixed")
        lines.append(f"**Weak scaling** ({what}): efficiency = (T_n / D_n) / (T_ref / D_ref).")
    lines.append(
        "T is the median of rank 0's logged tokens/s over the measured steps "
        f"(the first {warmup_steps} steps are warm-up and excluded), D the number of devices, the reference the "
        "point with the fewest devices of the same strategy; step time is the median with half the p10-p90 spread; "
        "peak memory is rank 0's. Node-hours / 1B tok = nodes x 10^9 / T / 3600."
    )
    summary, _ = fingerprint_summary(points)
    lines.append(f"Environment: {summary}.")
    return lines


def projection_table(points: Sequence[Point], tokens_target: float, overhead: float = 0.0) -> str:
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


def render_markdown(points: Sequence[Point], *, title: str, mode: str, warmup_steps: int,
                    tokens_target: Optional[float] = None, overhead: float = 0.0, plots: Sequence[str] = ()) -> str:
    out = [f"## Scaling: {title}", ""]
    if not points:
        return "\n".join(out + ["No run directories (with config.yaml) found.", ""])
    out += [" ".join(_header_paragraph(points, mode, warmup_steps)), "", markdown_table(points), ""]
    if tokens_target:
        ok = [p for p in points if p.ok]
        out.append(
            f"**Projection** for {tokens_target / 1e9:,.4g} billion training tokens"
            + (f" (+{overhead:.0%} for checkpoints, evaluation and restarts)" if overhead else
               " (no allowance for checkpoints, evaluation or restarts)")
            + ": wall-clock = tokens / T, node-hours = wall-clock x nodes, billing = node-hours x the partition's "
            "rate, assuming the measured throughput holds for the whole run."
        )
        out += ["", projection_table(points, tokens_target, overhead) if ok else "No measured point to project from.",
                ""]
    _, diffs = fingerprint_summary(points)
    notes = checks(points, mode) + diffs
    if notes:
        out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for plot in plots:
        out.append(f"![{Path(plot).stem}]({Path(plot).name})")
    if plots:
        out.append("")
    return "\n".join(out)


def write_csv(points: Sequence[Point], path: Path, tokens_target: Optional[float] = None,
              overhead: float = 0.0) -> Path:
    columns = CSV_FIELDS + (PROJECTION_FIELDS if tokens_target else [])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for p in points:
            row = {k: v for k, v in asdict(p).items() if k in CSV_FIELDS}
            if tokens_target and p.ok:
                proj = m.project(tokens_target, p, overhead=overhead)
                row.update(proj_wall_hours=proj["wall_hours"], proj_node_hours=proj["node_hours"],
                           proj_billing_units=proj["billing_units"])
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    tmp.replace(path)
    return path


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
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    out = Path(out_dir) if out_dir is not None else sweep_dir / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    points = collect_points(sweep_dir, warmup_steps)
    resolved = infer_mode(points) if mode == "auto" else mode

    plots: List[Path] = []
    plot_error = None
    try:
        from launcher.scaling import plots as plotting

        plots = [plotting.plot_throughput(points, out / "throughput.png"),
                 plotting.plot_efficiency(points, out / "efficiency.png", mode=resolved)]
    except ImportError as exc:
        plot_error = f"no plots: {exc} (pip install matplotlib)"

    csv_path = write_csv(points, out / "scaling.csv", tokens_target, overhead)
    text = render_markdown(points, title=sweep_dir.resolve().name, mode=resolved, warmup_steps=warmup_steps,
                           tokens_target=tokens_target, overhead=overhead, plots=[str(p) for p in plots])
    md_path = out / "scaling.md"
    md_path.write_text(text)
    return {"points": points, "mode": resolved, "markdown": text, "csv": csv_path, "md": md_path,
            "plots": plots, "plot_error": plot_error}
