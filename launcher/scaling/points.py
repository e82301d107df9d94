"""One point of a sweep: a run directory read into a ``Point`` (measured, or failed with the reason).

A run directory holds ``config.yaml`` (written by the launcher), ``metrics.jsonl`` (rank 0's training lines),
``environment.json`` (the fingerprint, ``launcher.scaling.fingerprint``), submitit's logs in ``slurm/`` and ``export/``
once training finished (names in ``launcher.rundir``).

A point is **failed** when a file it needs cannot be read (the reason names the file), when its metrics hold no
training line, when it did not complete (its largest logged step is below ``train.max_steps`` and there is no
``export/``), or when no step was logged after the warm-up. ``read_point`` never raises on a bad file.

The config is read as the job reads it: the YAML mapping (a regular file only) merged into the schema
(``config.load.from_plain``), so a value of the wrong type or an unknown key makes the point unreadable, not the report.

Login-node code: stdlib, PyYAML, omegaconf (the schema) and ``launcher.plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from launcher import rundir
from launcher.config.load import from_plain
from launcher.config.schema import LauncherConfig
from launcher.plan.devices import DEVICES
from launcher.plan.fit import planned_shape
from launcher.plan.flops import flops_for_shape
from launcher.scaling import metrics as m
from launcher.scaling.logs import clip, explain_failure
from launcher.scaling.records import read_fingerprint, read_records
from launcher.status.safe import load_yaml_mapping

CONFIG_MAX_BYTES = 4 << 20

DEFAULT_WARMUP_STEPS = 10
FAILED = "failed"


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
    mfu_source: str = ""  # "logged" (median of the job's mfu) or "computed" (launcher.plan.flops against the peak)
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
    # What was skipped while reading the point's files (a cut last line, NaN values, a bad fingerprint).
    warnings: List[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def per_device_batch_tokens(self) -> Optional[int]:
        if None in (self.micro_batch_size, self.grad_accum, self.seq_len):
            return None
        return int(self.micro_batch_size) * int(self.grad_accum) * int(self.seq_len)

    def fail(self, reason: str) -> "Point":
        self.status, self.reason = FAILED, clip(reason)
        return self


CSV_FIELDS = [f.name for f in fields(Point) if f.name not in ("fingerprint", "warnings")]
PROJECTION_FIELDS = ["proj_wall_hours", "proj_node_hours", "proj_billing_units"]


def unreadable_point(run_dir: Path, file_name: str, why: str) -> Point:
    """A failed point for a run directory whose ``file_name`` cannot be used."""
    return Point(name=run_dir.name, run_dir=str(run_dir), nodes=0, devices=0, strategy="?").fail(
        f"{file_name} unreadable: {why}")


# -- read the config ------------------------------------------------------------------------------------------------


def _schema_problem(exc: Exception) -> str:
    key = getattr(exc, "full_key", None)
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"does not fit the schema: {first}" + (f" (key {key})" if key else "")


def _point_config(run_dir: Path) -> Union[LauncherConfig, Point]:
    """config.yaml as the schema's ``LauncherConfig``, or a failed point naming the file and what is wrong with it."""
    from omegaconf.errors import OmegaConfBaseException

    tree, why = load_yaml_mapping(run_dir / rundir.CONFIG_FILE, CONFIG_MAX_BYTES)  # a regular file, YAML, a mapping
    if tree is None:
        return unreadable_point(run_dir, rundir.CONFIG_FILE, why or "absent")
    try:
        return from_plain(tree)
    except (OmegaConfBaseException, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        return unreadable_point(run_dir, rundir.CONFIG_FILE, _schema_problem(exc))  # hand-edited, another launcher's


def _model_numbers(cfg: LauncherConfig) -> Tuple[Optional[int], Optional[float]]:
    """(all base parameters, FLOPs per token by ``launcher.plan.flops``, LoRA adapters counted) from the config."""
    try:
        shape = planned_shape(cfg)
        lora = (shape.lora_params(cfg.peft.r, target_modules=tuple(cfg.peft.target_modules))
                if cfg.peft.name == "lora" else None)
    except ValueError:  # numbers the planner cannot use: MFU comes from the job's own log
        return None, None
    return shape.n_params(), flops_for_shape(shape, cfg.train.seq_len, lora)


def _point_from_config(run_dir: Path, cfg: LauncherConfig) -> Point:
    """The point as the config describes it: devices asked for, batch, model numbers, device peak, billing rate."""
    cluster, train = cfg.cluster, cfg.train
    nodes = cfg.nodes if cluster else 1
    devices = nodes * cluster.tasks if cluster else cfg.nproc_per_node or 1
    device = cluster.device if cluster else ""
    n_params, flops = _model_numbers(cfg)
    return Point(
        name=run_dir.name, run_dir=str(run_dir), nodes=nodes, devices=devices, strategy=cfg.strategy.name,
        max_steps=train.max_steps, micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum,
        seq_len=train.seq_len, flops_per_token=flops,
        peak_tflops=float(DEVICES[device].peak_bf16_tflops) if device in DEVICES else None,
        model=cfg.model.name, n_params=n_params, cluster=cluster.name if cluster else "local",
        partition=cluster.partition if cluster else "", device=device,
        billing_unit=cluster.billing_unit if cluster else None,
        billing_per_node_hour=m.billing_rate_per_node_hour(cluster),
    )


# -- guess the devices ----------------------------------------------------------------------------------------------


def _devices(train_records: List[Mapping[str, Any]], fingerprint: Optional[Mapping[str, Any]], asked: int) -> int:
    """What the job saw (the last logged world_size, the fingerprint's, tokens/s over tokens/s per device), else
    what the config asked for."""
    for record in reversed(train_records):
        if isinstance(record.get("world_size"), int) and not isinstance(record["world_size"], bool) \
                and record["world_size"] > 0:
            return record["world_size"]
    if fingerprint and isinstance(fingerprint.get("world_size"), int) and fingerprint["world_size"] > 0:
        return fingerprint["world_size"]
    for record in train_records:
        per_device = record.get("tokens_per_s_per_device")
        if isinstance(per_device, (int, float)) and per_device > 0:
            return max(1, min(round(record["tokens_per_s"] / per_device), 10 ** 7))
    return asked


def _apply_fingerprint(point: Point, fingerprint: Optional[Mapping[str, Any]]) -> None:
    point.fingerprint = dict(fingerprint) if fingerprint else None
    if fingerprint:
        point.job_id = str(fingerprint.get("job_id") or "")
        point.nodelist = str(fingerprint.get("nodelist") or "")
        point.git_commit = str(fingerprint.get("git_commit") or "")


def _global_batch(point: Point) -> Optional[int]:
    per_device = point.per_device_batch_tokens
    return per_device * point.devices if per_device is not None else None


# -- measure, classify, bill ----------------------------------------------------------------------------------------


def _failure(point: Point, run_dir: Path, has_train_records: bool, stats: Mapping[str, Any],
             warmup_steps: int) -> Optional[str]:
    """Why the point cannot be measured (None when it can): no metrics, incomplete, nothing after the warm-up."""
    if not has_train_records:
        missing = "" if (run_dir / rundir.METRICS_FILE).exists() else f" (no {rundir.METRICS_FILE})"
        return explain_failure(run_dir, "no metrics" + missing)
    finished = (run_dir / rundir.EXPORT_DIR).is_dir() or (
        point.max_steps is not None and point.last_step >= point.max_steps)
    if not finished:
        return explain_failure(run_dir, f"incomplete: last logged step {point.last_step} of {point.max_steps}, "
                                        f"no {rundir.EXPORT_DIR}/ (still running?)")
    if stats["measured_steps"] == 0:
        return (f"no steps after warm-up: last step {point.last_step}, --warmup-steps {warmup_steps}; "
                "run more steps or lower --warmup-steps")
    return None


def _measure(point: Point, stats: Mapping[str, Any]) -> None:
    """Throughput, step time and MFU (the job's logged MFU first, else computed from the config's FLOPs)."""
    point.tokens_per_s = stats["tokens_per_s"]
    point.per_device = stats["tokens_per_s_per_device"] or point.tokens_per_s / point.devices
    point.step_time = stats["step_time_s"]
    point.step_time_p10, point.step_time_p90 = stats["step_time_p10_s"], stats["step_time_p90_s"]
    point.step_time_std, point.spread = stats["step_time_std_s"], stats["spread"]
    if stats["mfu"] is not None:
        point.mfu, point.mfu_source = stats["mfu"], "logged"
    elif point.flops_per_token and point.peak_tflops:
        point.mfu = m.mfu(point.tokens_per_s, point.flops_per_token, point.devices, point.peak_tflops)
        point.mfu_source = "computed"


def _bill(point: Point) -> None:
    """Node-hours and billing units per billion tokens at the measured throughput."""
    point.node_hours_per_btok = m.node_hours_per_billion_tokens(point.tokens_per_s, point.nodes)
    if point.billing_per_node_hour is not None:
        point.billing_per_btok = m.billing_units_per_billion_tokens(
            point.tokens_per_s, point.nodes, point.billing_per_node_hour)


def _read_measured(run_dir: Path, point: Point, warmup_steps: int) -> Point:
    """Fill ``point`` (as the config describes it) from the metrics and the fingerprint."""
    records, point.warnings, problem = read_records(run_dir / rundir.METRICS_FILE)  # a cut last line is skipped
    if problem:
        return point.fail(f"{rundir.METRICS_FILE} unreadable: {problem}")
    train_records = [r for r in records if m.is_train_record(r)]
    fingerprint, fingerprint_warnings = read_fingerprint(run_dir)
    point.warnings += fingerprint_warnings
    _apply_fingerprint(point, fingerprint)
    point.devices = _devices(train_records, fingerprint, point.devices)
    point.global_batch_tokens = _global_batch(point)
    stats = m.throughput_stats(train_records, warmup_steps, tokens_per_step=point.global_batch_tokens)
    point.logged_steps, point.last_step = stats["logged_steps"], stats["last_step"]
    point.measured_steps, point.peak_mem_gb = stats["measured_steps"], stats["peak_mem_gb"]
    reason = _failure(point, run_dir, bool(train_records), stats, warmup_steps)
    if reason:
        return point.fail(reason)
    _measure(point, stats)
    _bill(point)
    return point


def read_point(run_dir: Path, warmup_steps: int = DEFAULT_WARMUP_STEPS) -> Point:
    """One run directory as a ``Point`` (efficiency is filled in by ``sweep.collect_points``, against its group)."""
    run_dir = Path(run_dir)
    cfg = _point_config(run_dir)
    if isinstance(cfg, Point):
        return cfg
    return _read_measured(run_dir, _point_from_config(run_dir, cfg), warmup_steps)
