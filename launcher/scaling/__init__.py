"""Scaling benchmarks: the report over a sweep directory, its arithmetic, its plots, and the environment fingerprint.

Login-node code: stdlib only at import time (matplotlib is imported inside ``plots``; torch only inside
``fingerprint.collect_fingerprint``, which runs in the job). See docs/scaling.md.

    python -m launcher.scaling report runs/ --tokens 2e11
"""

from __future__ import annotations

from launcher.scaling.metrics import (
    billing_rate_per_node_hour,
    billing_units_per_billion_tokens,
    model_flops_per_token,
    mfu,
    node_hours_per_billion_tokens,
    project,
    scaling_efficiency,
    throughput_stats,
)
from launcher.scaling.report import Point, collect_points, write_report

__all__ = [
    "Point",
    "billing_rate_per_node_hour",
    "billing_units_per_billion_tokens",
    "collect_points",
    "mfu",
    "model_flops_per_token",
    "node_hours_per_billion_tokens",
    "project",
    "scaling_efficiency",
    "throughput_stats",
    "write_report",
]
