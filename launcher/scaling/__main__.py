"""python -m launcher.scaling report SWEEP_DIR [--out DIR] [--mode auto|strong|weak] [--warmup-steps N]
                                        [--tokens 2e11] [--overhead 0.1]

Writes scaling.csv, scaling.md, throughput.png and efficiency.png (default into SWEEP_DIR/scaling/), prints the
markdown and where the files went. Exit 0 when at least one point was measured, 1 when none was, 2 on bad arguments.
See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from launcher.scaling.points import DEFAULT_WARMUP_STEPS
from launcher.scaling.report import write_report
from launcher.scaling.sweep import MODES


def _tokens(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r} (e.g. 2e11)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the token count must be positive, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launcher.scaling", description="Scaling reports of benchmark sweeps.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="CSV, markdown table and plots of a sweep directory")
    r.add_argument("sweep_dir", help="the sweep's output directory (e.g. runs/), or a single run directory")
    r.add_argument("--out", default=None, help="where the report goes (default: SWEEP_DIR/scaling)")
    r.add_argument("--mode", choices=MODES, default="auto",
                   help="strong (fixed global batch) or weak (fixed per-device batch); auto infers it from the batches")
    r.add_argument("--warmup-steps", type=_non_negative_int, default=DEFAULT_WARMUP_STEPS,
                   help=f"logged steps <= N are excluded from the measurement (default {DEFAULT_WARMUP_STEPS})")
    r.add_argument("--tokens", type=_tokens, default=None,
                   help="project node-hours and billing units for a full run of this many tokens (e.g. 2e11)")
    r.add_argument("--overhead", type=float, default=0.0,
                   help="extra fraction added to the projection for checkpoints, evaluation, restarts (e.g. 0.1)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = write_report(args.sweep_dir, args.out, mode=args.mode, warmup_steps=args.warmup_steps,
                              tokens_target=args.tokens, overhead=args.overhead)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"report: {result['md']}")
    print(f"csv:    {result['csv']}")
    for plot in result["plots"]:
        print(f"plot:   {plot}")
    if result["plot_error"]:
        print(result["plot_error"], file=sys.stderr)
    points = result["points"]
    failed = [p for p in points if not p.ok]
    summary = f"{len(points) - len(failed)} of {len(points)} points measured"
    print(summary + (f", {len(failed)} failed" if failed else ""))
    return 0 if len(failed) < len(points) else 1


if __name__ == "__main__":
    sys.exit(main())
