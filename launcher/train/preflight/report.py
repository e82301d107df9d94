"""The preflight's verdict: findings, the report, the rank-0 table, the failure message and ``preflight.json``.

Stdlib only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from launcher.train.preflight.records import VISIBLE_VARS, format_ints

# How many lines of one check a message or a table shows (all of them are in preflight.json).
MAX_LINES_PER_CHECK = 8


class PreflightError(RuntimeError):
    """The preflight failed: raised on every rank with the same message; ``report`` holds the details."""

    def __init__(self, message: str, report: Optional["PreflightReport"] = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Finding:
    """One result of a check: ``fail`` stops the job, ``warn`` does not, ``info`` is a note."""

    level: str  # "fail" | "warn" | "info"
    check: str  # device | gpu_sharing | cpu_binding | numa | allreduce | bandwidth | transport | world | attention
    message: str
    ranks: List[int] = field(default_factory=list)
    hint: str = ""

    def line(self) -> str:
        return f"{self.level.upper():4} {self.check}: {self.message}"


def decide(findings: Sequence[Finding]) -> bool:
    """The verdict: passed unless a finding failed."""
    return not any(f.level == "fail" for f in findings)


def mib(nbytes: int) -> str:
    """``33554432`` -> ``"32 MiB"``."""
    return f"{nbytes / 2**20:g} MiB"


@dataclass
class PreflightReport:
    """The verdict, identical on every rank; ``to_dict()`` is what ``preflight.json`` holds."""

    ok: bool
    world_size: int
    hosts: List[str]
    findings: List[Finding]
    records: List[Dict[str, Any]]  # one per rank, by rank
    bandwidth: Dict[str, Any]  # bytes, time_s, algbw_gbps, busbw_gbps, expected_busbw_gbps (GB/s = 1e9 B/s)
    transport: str  # the slowest transport any node reported, or "n/a" (gloo) / "unknown"
    backend: str
    elapsed_s: float
    json_path: Optional[str] = None

    @property
    def failures(self) -> List[Finding]:
        return [f for f in self.findings if f.level == "fail"]

    @property
    def warnings(self) -> List[Finding]:
        return [f for f in self.findings if f.level == "warn"]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The header line: ranks, hosts, backend, devices, bandwidth and transport."""
        bw = self.bandwidth
        if bw.get("busbw_gbps") is not None:
            expected = bw.get("expected_busbw_gbps")
            bw_text = (f"all-reduce {mib(bw['bytes'])}: busbw {bw['busbw_gbps']:.2f} GB/s"
                       + (f" (expected {expected:g})" if expected else ""))
        else:
            bw_text = f"all-reduce: {bw.get('skipped', 'not measured')}"
        devices = sorted({r.get("gpu_name") or r.get("device_type", "?") for r in self.records})
        return (f"{self.world_size} rank(s) on {len(self.hosts)} host(s), backend {self.backend}, "
                f"{'/'.join(devices)}; {bw_text}; transport {self.transport}")

    def format_table(self, max_rows: int = 256) -> str:
        return format_table(self, max_rows=max_rows)


def _limited(findings: Sequence[Finding], levels: Sequence[str]) -> List[str]:
    """The findings of ``levels``, at most ``MAX_LINES_PER_CHECK`` per check, each hint once."""
    lines: List[str] = []
    per_check: Dict[Tuple[str, str], int] = {}
    hinted: set = set()
    for f in findings:
        if f.level not in levels:
            continue
        key = (f.level, f.check)
        per_check[key] = per_check.get(key, 0) + 1
        if per_check[key] == MAX_LINES_PER_CHECK + 1:
            total = sum(1 for g in findings if (g.level, g.check) == key)
            more = total - MAX_LINES_PER_CHECK
            lines.append(f"  {f.level.upper():4} {f.check}: ... and {more} more (preflight.json)")
        if per_check[key] > MAX_LINES_PER_CHECK:
            continue
        lines.append("  " + f.line())
        if f.hint and (f.check, f.hint) not in hinted:
            hinted.add((f.check, f.hint))
            lines.append(f"       hint: {f.hint}")
    return lines


def _row(r: Dict[str, Any]) -> Tuple[str, ...]:
    """One rank's line of the table."""
    visible = r.get("visible") or {}
    vis = ",".join(f"{v.split('_')[0]}={visible[v]}" for v in VISIBLE_VARS if v in visible) or "-"
    gpu = "-"
    if r.get("gpu_name"):
        gpu = f"{r['gpu_name'][:24]} [{r.get('gpu_id_kind')} {r.get('gpu_id')}]"
    numa = format_ints(r.get("numa_cpu") or []) or "-"
    if r.get("numa_gpu") is not None:
        numa += f"/gpu {r['numa_gpu']}"
    return (str(r["rank"]), str(r["local_rank"]), str(r["host"])[:24], str(r.get("device")), gpu, vis[:40],
            f"{r.get('cpus')} ({r.get('n_cpus')})"[:32], numa, str(r.get("transport") or "-"))


def format_table(report: PreflightReport, max_rows: int = 256) -> str:
    """The rank-0 printout: a header, one line per rank (up to ``max_rows``), then the findings and the verdict."""
    rows = sorted(report.records, key=lambda r: r["rank"])
    named = {rank for f in report.findings if f.level in ("fail", "warn") for rank in f.ranks}
    if len(rows) > max_rows:
        keep = {r["rank"] for r in rows[:max_rows]} | named
        shown = [r for r in rows if r["rank"] in keep]
    else:
        shown = rows
    header = ("rank", "local", "host", "device", "gpu", "visible", "cpus", "numa", "net")
    table = [header] + [_row(r) for r in shown]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"preflight: {report.summary()}"]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if len(shown) < len(rows):
        lines.append(f"  ... {len(rows) - len(shown)} more rank(s) in preflight.json")
    lines += _limited(report.findings, ("fail", "warn", "info"))
    verdict = "PASSED" if report.ok else "FAILED"
    extra = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    lines.append(f"preflight: {verdict} in {report.elapsed_s:.2f}s{extra}"
                 + (f"; details in {report.json_path}" if report.json_path else ""))
    return "\n".join(lines)


def format_failure(report: PreflightReport) -> str:
    """The ``PreflightError`` message: identical on every rank."""
    failed = sorted({rank for f in report.failures for rank in f.ranks})
    who = f"on {len(failed)} of {report.world_size} rank(s)" if failed else f"({report.world_size} rank(s))"
    lines = [f"preflight failed {who}, {len(report.hosts)} host(s): training not started"]
    lines += _limited(report.findings, ("fail",))
    lines += _limited(report.findings, ("warn",))
    if report.json_path:
        lines.append(f"details: {report.json_path}")
    lines.append("to skip the preflight (not recommended): train.preflight=false")
    return "\n".join(lines)


def write_json(report: PreflightReport, path: Path) -> None:
    """``report.to_dict()`` to ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
