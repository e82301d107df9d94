"""The arithmetic of a scaling report: pure functions, stdlib only.

Conventions, stated once:

- Throughput T is training tokens per second of the whole job (all data-parallel ranks), as the training loop logs it
  in ``metrics.jsonl`` (``tokens_per_s``: tokens of the logging window / wall time of the window, evaluation and
  checkpoint time excluded). D is the number of devices (ranks: one per GPU, one per MI250X GCD).
- Model FLOPs per token: ``launcher.plan.flops`` (THE count, shared with the dry run's budget and the job's MFU; for
  full training ``6 N + 12 L H S``, PaLM appendix B), so the report's MFU and the one the job logs agree.
- MFU is a fraction (0.42 means 42 %) against the device's dense bf16 peak
  (``launcher.plan.devices.DEVICES[...].peak_bf16_tflops``).
- Billing: ``billing_rate_per_node_hour`` gives the units one node costs per hour, with the rule of
  ``launcher.plan.job.billing_units`` (a partition's ``billing_per_node_hour`` first, e.g. LUMI standard-g = 4
  GPU-hours per node-hour; else by ``billing_unit``).
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from launcher.config.schema import ClusterConfig

SECONDS_PER_HOUR = 3600.0
BILLION = 1e9
MODES = ("strong", "weak")


# ---------------------------------------------------------------------------------------------------------------------
# Throughput of one run
# ---------------------------------------------------------------------------------------------------------------------
def is_train_record(record: Mapping[str, Any]) -> bool:
    """A training line of ``metrics.jsonl`` (eval lines carry ``eval_loss`` and no throughput)."""
    return (
        isinstance(record, Mapping)
        and "eval_loss" not in record
        and isinstance(record.get("step"), (int, float))
        and isinstance(record.get("tokens_per_s"), (int, float))
        and record["tokens_per_s"] > 0
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _step_times(records: Sequence[Mapping[str, Any]], tokens_per_step: Optional[float]) -> List[Optional[float]]:
    """Seconds per optimizer step for each record (None where it cannot be derived).

    In order of preference: the logged ``step_time_s``; ``tokens_per_step / tokens_per_s`` (tokens_per_step = micro
    batch x grad accum x world size x seq len, from the config); the same with tokens_per_step taken from the
    cumulative ``tokens`` field of consecutive records (delta tokens / delta step).
    """
    times: List[Optional[float]] = []
    previous: Optional[Mapping[str, Any]] = None
    for record in records:
        value = record.get("step_time_s")
        if isinstance(value, (int, float)) and value > 0:
            times.append(float(value))
        elif tokens_per_step:
            times.append(float(tokens_per_step) / float(record["tokens_per_s"]))
        elif (
            previous is not None
            and isinstance(record.get("tokens"), (int, float))
            and isinstance(previous.get("tokens"), (int, float))
            and record["step"] > previous["step"]
            and record["tokens"] > previous["tokens"]
        ):
            per_step = (record["tokens"] - previous["tokens"]) / (record["step"] - previous["step"])
            times.append(per_step / float(record["tokens_per_s"]))
        else:
            times.append(None)
        previous = record
    return times


_MEASURED_KEYS = ("tokens_per_s", "tokens_per_s_per_device", "mfu")
_STEP_TIME_KEYS = ("step_time_s", "step_time_p10_s", "step_time_p90_s", "step_time_std_s", "spread")


def _medians(measured: Sequence[Mapping[str, Any]]) -> Dict[str, Optional[float]]:
    """Median of each of ``_MEASURED_KEYS`` over the records that logged it (None where none did)."""
    out: Dict[str, Optional[float]] = {}
    for key in _MEASURED_KEYS:
        values = [float(r[key]) for r in measured if isinstance(r.get(key), (int, float))]
        out[key] = statistics.median(values) if values else None
    return out


def _step_time_stats(times: Sequence[float]) -> Dict[str, Optional[float]]:
    """Median, p10, p90, population std and relative p10-p90 spread of the step times (all None for none)."""
    if not times:
        return dict.fromkeys(_STEP_TIME_KEYS)
    median = statistics.median(times)
    p10, p90 = percentile(times, 10), percentile(times, 90)
    return {"step_time_s": median, "step_time_p10_s": p10, "step_time_p90_s": p90,
            "step_time_std_s": statistics.pstdev(times), "spread": (p90 - p10) / median if median > 0 else None}


def throughput_stats(
    step_records: Iterable[Mapping[str, Any]], warmup_steps: int, *, tokens_per_step: Optional[float] = None
) -> Dict[str, Any]:
    """Summary of the measured (post-warm-up) steps of one run.

    ``step_records``: the lines of ``metrics.jsonl`` (eval lines and lines without ``tokens_per_s`` are ignored).
    A record is measured when its ``step > warmup_steps``. With ``train.log_every = k > 1`` a record is the average of
    the k steps before it, so the warm-up cut is exact only when ``warmup_steps`` is a multiple of k.

    Returns:
        tokens_per_s             median over measured records of ``tokens_per_s``
        tokens_per_s_per_device  median of the logged ``tokens_per_s_per_device`` (None when not logged)
        step_time_s              median seconds per step (see ``_step_times``); None when it cannot be derived
        step_time_p10_s, step_time_p90_s   10th / 90th percentiles of the step time
        step_time_std_s          population standard deviation of the step time
        spread                   (p90 - p10) / median of the step time: relative jitter, 0.05 = 5 %
        mfu                      median of the logged ``mfu`` (None when not logged)
        peak_mem_gb              max of ``peak_mem_gb`` over ALL training records (warm-up included: the peak is a
                                 running maximum, and it is rank 0's)
        logged_steps             number of training records; last_step the largest step logged
        measured_steps           number of measured records (0: nothing after warm-up, all values None)
    """
    train = sorted((r for r in step_records if is_train_record(r)), key=lambda r: r["step"])
    measured = [r for r in train if r["step"] > warmup_steps]
    mems = [float(r["peak_mem_gb"]) for r in train if isinstance(r.get("peak_mem_gb"), (int, float))]
    stats: Dict[str, Any] = {
        "logged_steps": len(train),
        "last_step": int(train[-1]["step"]) if train else 0,
        "measured_steps": len(measured),
        "peak_mem_gb": max(mems) if mems else None,
    }
    stats.update(_medians(measured))
    # The first measured record has no predecessor for the delta-tokens rule: give it the last warm-up record.
    context = [r for r in train if r["step"] <= warmup_steps][-1:] + measured
    times = [t for t in _step_times(context, tokens_per_step)[-len(measured):] if t is not None] if measured else []
    stats.update(_step_time_stats(times))
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# MFU
# ---------------------------------------------------------------------------------------------------------------------
def mfu(tokens_per_s: float, flops_per_token: float, devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation as a fraction: ``tokens_per_s * flops_per_token / (devices * peak_tflops * 1e12)``.

    ``peak_tflops`` is the dense bf16 peak of ONE device as a rank sees it (MI250X: one GCD, 191.5; A100: 312).
    """
    if devices <= 0 or peak_tflops <= 0:
        raise ValueError(f"devices ({devices}) and peak_tflops ({peak_tflops}) must be positive")
    return tokens_per_s * flops_per_token / (devices * peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------------------------------------
# Scaling efficiency
# ---------------------------------------------------------------------------------------------------------------------
def scaling_efficiency(points: Sequence[Tuple[int, float]], mode: str = "strong") -> List[float]:
    """Parallel efficiency of each point against the point with the fewest devices (the reference, efficiency 1.0).

    ``points``: ``(devices, tokens_per_s)`` pairs; the result is in the same order.

    - strong scaling (fixed global batch: the same work per step, split over more devices):
      ``eff_n = (T_n / T_1) / (D_n / D_1)`` = speed-up over ideal speed-up.
    - weak scaling (fixed per-device batch: work per step grows with devices):
      ``eff_n = (T_n / D_n) / (T_1 / D_1)`` = per-device throughput kept; equivalently step_time_1 / step_time_n.

    With throughput (tokens/s) as the measure both are the same number, the ratio of per-device throughputs; the
    mode says which experiment it describes (what was held fixed), and the report checks the sweep did hold it.
    Ties for the fewest devices: the first such point is the reference.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not points:
        return []
    for devices, tokens in points:
        if devices <= 0 or tokens <= 0:
            raise ValueError(f"devices and tokens_per_s must be positive, got ({devices}, {tokens})")
    ref_devices, ref_tokens = min(points, key=lambda p: p[0])
    if mode == "strong":
        return [(t / ref_tokens) / (d / ref_devices) for d, t in points]
    return [(t / d) / (ref_tokens / ref_devices) for d, t in points]


# ---------------------------------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------------------------------
def node_hours_per_billion_tokens(tokens_per_s: float, nodes: float) -> float:
    """``nodes * (1e9 / tokens_per_s) / 3600``: node-hours to train one billion tokens at this throughput."""
    if tokens_per_s <= 0:
        raise ValueError(f"tokens_per_s must be positive, got {tokens_per_s}")
    return nodes * BILLION / tokens_per_s / SECONDS_PER_HOUR


def billing_rate_per_node_hour(cluster: Optional["ClusterConfig"]) -> Optional[float]:
    """Billing units one node costs per hour, in the cluster's ``billing_unit``; None for a local run.

    The launcher's own rule (``launcher.plan.job.billing_units``) for one node and one hour: the partition's
    ``billing_per_node_hour`` (LUMI standard-g: 4 GPU-hours), else LUMI's GPU-hour rule (whole node when exclusive),
    core-hours, or node-hours (Leonardo: 1).
    """
    if not cluster:
        return None
    from launcher.plan.billing import billing_units

    return float(billing_units(cluster, 1, 3600))


def billing_units_per_billion_tokens(tokens_per_s: float, nodes: float, rate_per_node_hour: float) -> float:
    """``node_hours_per_billion_tokens(tokens_per_s, nodes) * rate_per_node_hour`` (see ``billing_rate_per_node_hour``).

    LUMI standard-g (4 GPU-hours per node-hour), 2 nodes at 100k tokens/s: 2 * 1e9 / 1e5 / 3600 * 4 = 22.2 GPU-hours.
    """
    return node_hours_per_billion_tokens(tokens_per_s, nodes) * rate_per_node_hour


def _field(point: Any, name: str) -> Any:
    if isinstance(point, Mapping):
        return point.get(name)
    return getattr(point, name, None)


def project(total_tokens: float, point: Any, *, overhead: float = 0.0) -> Dict[str, Optional[float]]:
    """Cost of training ``total_tokens`` at a measured point, assuming its throughput holds for the whole run.

    ``point``: a ``points.Point`` or a mapping with ``tokens_per_s``, ``nodes`` and optionally
    ``billing_per_node_hour``. ``overhead``: extra fraction for what a benchmark does not see (checkpoints, evaluation,
    restarts, queue-side failures); 0.1 adds 10 %.

        wall_hours    = total_tokens / tokens_per_s / 3600 * (1 + overhead)
        node_hours    = wall_hours * nodes
        billing_units = node_hours * billing_per_node_hour      (None when the rate is unknown)
    """
    tokens_per_s = _field(point, "tokens_per_s")
    nodes = _field(point, "nodes")
    if not tokens_per_s or tokens_per_s <= 0 or not nodes:
        raise ValueError("project() needs a measured point (tokens_per_s > 0 and nodes)")
    rate = _field(point, "billing_per_node_hour")
    wall_hours = total_tokens / tokens_per_s / SECONDS_PER_HOUR * (1.0 + overhead)
    node_hours = wall_hours * nodes
    return {
        "wall_hours": wall_hours,
        "node_hours": node_hours,
        "billing_units": node_hours * rate if rate is not None else None,
    }
