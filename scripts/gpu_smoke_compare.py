"""The verdict of scripts/gpu_smoke.sh: each strategy's losses against the fp32 CPU reference, as a PASS/FAIL table.

    python scripts/gpu_smoke_compare.py OUT --steps 5 --rtol 2e-2 --device cuda --precision bf16 ddp zero1 ...

reads, for the reference and each strategy NAME, ``OUT/smoke-NAME/metrics.jsonl`` (records with ``step`` and ``loss``,
written by rank 0) and ``OUT/logs/smoke-NAME.{log,rc,time}`` (the run's output, exit code and seconds, written by the
shell script). A strategy passes when its run exited 0 on the expected device, logged every step 1..steps with a finite
loss, and ``|loss - reference| <= rtol * |reference|`` at every step. Exit 0 when all pass, 1 otherwise.
Stdlib only (it runs before anything else is known to work).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REFERENCE = "reference"
_DEVICE = re.compile(r"train: run \S+: .* device (\S+), strategy")


@dataclass
class Outcome:
    name: str
    device: str = "?"
    exit_code: Optional[int] = None
    seconds: Optional[float] = None
    losses: Dict[int, float] = field(default_factory=dict)
    max_rel: Optional[float] = None
    worst_step: Optional[int] = None
    problems: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def run_dir(out: Path, name: str) -> Path:
    return out / f"smoke-{name}"


def read_losses(path: Path) -> Dict[int, float]:
    """step -> loss of the training records of a metrics.jsonl (eval and event records have no ``loss``)."""
    losses: Dict[int, float] = {}
    if not path.is_file():
        return losses
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record and "step" in record and record["loss"] is not None:
            losses[int(record["step"])] = float(record["loss"])
    return losses


def run_device(log_text: str) -> str:
    """The device rank 0 reported (``train: run NAME: ... device cuda:0, strategy ...``), or ``?``."""
    match = _DEVICE.search(log_text or "")
    return match.group(1) if match else "?"


def load(out: Path, name: str) -> Outcome:
    logs = out / "logs"
    outcome = Outcome(name)
    log = logs / f"smoke-{name}.log"
    outcome.device = run_device(log.read_text(errors="replace")) if log.is_file() else "?"
    try:
        outcome.exit_code = int((logs / f"smoke-{name}.rc").read_text().strip())
    except (OSError, ValueError):
        outcome.exit_code = None
    try:
        outcome.seconds = float((logs / f"smoke-{name}.time").read_text().strip())
    except (OSError, ValueError):
        outcome.seconds = None
    outcome.losses = read_losses(run_dir(out, name) / "metrics.jsonl")
    return outcome


def check_run(outcome: Outcome, *, steps: int, device: str) -> None:
    """Exit code, device and a finite loss at every step (problems are appended)."""
    if outcome.exit_code != 0:
        outcome.problems.append("did not run" if outcome.exit_code is None else f"exit {outcome.exit_code}")
    if not outcome.device.startswith(device):
        outcome.problems.append(f"ran on {outcome.device}, expected {device}")
    missing = [s for s in range(1, steps + 1) if s not in outcome.losses]
    if missing:
        outcome.problems.append(f"no loss at step(s) {','.join(map(str, missing))}")
    bad = [s for s, loss in sorted(outcome.losses.items()) if not math.isfinite(loss)]
    if bad:
        outcome.problems.append(f"loss not finite at step(s) {','.join(map(str, bad))}")


def compare(outcome: Outcome, reference: Dict[int, float], *, steps: int, rtol: float) -> None:
    """Relative difference from the reference at each step 1..steps; the largest and its step are kept."""
    worst: Optional[float] = None
    for step in range(1, steps + 1):
        if step not in outcome.losses or step not in reference:
            continue
        got, ref = outcome.losses[step], reference[step]
        rel = abs(got - ref) / max(abs(ref), 1e-12) if math.isfinite(got) else math.inf
        if worst is None or rel > worst:
            worst, outcome.worst_step = rel, step
    outcome.max_rel = worst
    if worst is not None and worst > rtol:
        step = outcome.worst_step
        outcome.problems.append(f"loss {outcome.losses[step]:.5f} vs reference {reference[step]:.5f} at step {step} "
                                f"(relative {worst:.2e} > {rtol:g})")


def evaluate(out: Path, strategies: Sequence[str], *, steps: int, rtol: float, device: str,
             reference_device: str = "cpu") -> List[Outcome]:
    """The reference first, then each strategy; a broken reference fails every strategy."""
    ref = load(out, REFERENCE)
    check_run(ref, steps=steps, device=reference_device)
    outcomes = [ref]
    for name in strategies:
        outcome = load(out, name)
        check_run(outcome, steps=steps, device=device)
        if ref.passed:
            compare(outcome, ref.losses, steps=steps, rtol=rtol)
        else:
            outcome.problems.append("no usable reference")
        outcomes.append(outcome)
    return outcomes


def format_table(outcomes: Sequence[Outcome], *, precision: str, reference_precision: str, rtol: float) -> str:
    header = ("run", "device", "precision", "exit", "steps", "max rel diff", "time", "result", "why")
    rows = [header]
    for o in outcomes:
        rel = "-" if o.max_rel is None else f"{o.max_rel:.2e} @{o.worst_step}"
        rows.append((o.name, o.device, reference_precision if o.name == REFERENCE else precision,
                     "-" if o.exit_code is None else str(o.exit_code), str(len(o.losses)),
                     "(reference)" if o.name == REFERENCE else rel,
                     "-" if o.seconds is None else f"{o.seconds:.0f}s",
                     "PASS" if o.passed else "FAIL", "; ".join(o.problems) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ---")
    lines.append(f"tolerance: |loss - reference| <= {rtol:g} x |reference| at every step "
                 f"({precision} against the {reference_precision} CPU reference)")
    return "\n".join(lines)


def attention_notes(out: Path, names: Sequence[str]) -> List[str]:
    """The preflight's attention probe of the first GPU run that has one (what flash/efficient SDPA did here)."""
    for name in names:
        path = run_dir(out, name) / "preflight.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        probe = next((r.get("attention") for r in report.get("records", []) if r.get("attention")), None)
        if not probe:
            continue
        diff = probe.get("max_abs_diff")
        lines = [f"attention probe ({name}, rank 0, {probe.get('device_name')}, {probe.get('runtime')}): "
                 f"flash {'ok' if probe.get('flash_available') else 'NO'}, "
                 f"flash GQA {'ok' if probe.get('flash_gqa_ok') else 'NO'}, "
                 f"memory-efficient masked {'ok' if probe.get('efficient_masked_ok') else 'NO'}, "
                 f"max |diff| from math {'-' if diff is None else f'{diff:.2e}'}"]
        lines += [f"  {f['level'].upper()} {f['check']}: {f['message']}" for f in report.get("findings", [])
                  if f.get("check") == "attention"]
        return lines
    return []


def log_tails(out: Path, outcomes: Sequence[Outcome], lines: int = 15) -> List[str]:
    shown = []
    for o in outcomes:
        if o.exit_code in (0, None):
            continue
        log = out / "logs" / f"smoke-{o.name}.log"
        tail = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
        shown.append(f"--- last {len(tail)} lines of {log}")
        shown += tail
    return shown


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the smoke test's output folder")
    parser.add_argument("strategies", nargs="+")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--rtol", type=float, required=True)
    parser.add_argument("--device", default="cuda", help="the device the strategies must run on (prefix)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--reference-precision", default="fp32")
    args = parser.parse_args(argv)
    outcomes = evaluate(args.out, args.strategies, steps=args.steps, rtol=args.rtol, device=args.device)
    print(format_table(outcomes, precision=args.precision, reference_precision=args.reference_precision,
                       rtol=args.rtol))
    for line in attention_notes(args.out, args.strategies) + log_tails(args.out, outcomes):
        print(line)
    failed = [o.name for o in outcomes if not o.passed]
    passed = len(args.strategies) - len([n for n in failed if n != REFERENCE])
    if failed:
        print(f"gpu_smoke: FAIL ({passed} of {len(args.strategies)} strategies passed; failed: {', '.join(failed)})")
        return 1
    print(f"gpu_smoke: PASS ({passed} of {len(args.strategies)} strategies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
