"""python -m launcher.scaling report SWEEP_DIR [--out DIR] [--mode auto|strong|weak] [--warmup-steps N]
                                        [--tokens 2e11] [--overhead 0.1]

Writes scaling.csv, scaling.md, throughput.png and efficiency.png (default into SWEEP_DIR/scaling/), prints the
markdown and where the files went. Exit 0 when at least one point was measured, 1 when none was, 2 on bad arguments.
See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from launcher.cli_errors import ArgumentParser, clean, run_cli
from launcher.scaling.points import DEFAULT_WARMUP_STEPS
from launcher.scaling.report import write_report
from launcher.scaling.sweep import MODES


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number ({what})") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number ({what})")
    return value


def _tokens(text: str) -> float:
    value = _finite(text, "a token count such as 2e11")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the token count must be positive (e.g. 2e11)")
    return value


def _overhead(text: str) -> float:
    value = _finite(text, "a fraction such as 0.1")
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{text!r}: the overhead is a fraction from 0 to 10 (0.1 adds 10 %)")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (steps)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m launcher.scaling", description="Scaling reports of benchmark sweeps.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    r = sub.add_parser("report", help="CSV, markdown table and plots of a sweep directory")
    r.add_argument("sweep_dir", help="the sweep's output directory (e.g. runs/), or a single run directory")
    r.add_argument("--out", default=None, help="where the report goes (default: SWEEP_DIR/scaling)")
    r.add_argument("--mode", choices=MODES, default="auto",
                   help="strong (fixed global batch) or weak (fixed per-device batch); auto infers it from the batches")
    r.add_argument("--warmup-steps", type=_non_negative_int, default=DEFAULT_WARMUP_STEPS,
                   help=f"logged steps <= N are excluded from the measurement (default {DEFAULT_WARMUP_STEPS})")
    r.add_argument("--tokens", type=_tokens, default=None,
                   help="project node-hours and billing units for a full run of this many tokens (e.g. 2e11)")
    r.add_argument("--overhead", type=_overhead, default=0.0,
                   help="extra fraction added to the projection for checkpoints, evaluation, restarts (e.g. 0.1)")
    return p


def _main(argv: List[str]) -> int:
    args = parser().parse_args(argv)
    result = write_report(args.sweep_dir, args.out, mode=args.mode, warmup_steps=args.warmup_steps,
                          tokens_target=args.tokens, overhead=args.overhead)
    print(result["markdown"])
    print(f"report: {clean(result['md'])}")
    print(f"csv:    {clean(result['csv'])}")
    for plot in result["plots"]:
        print(f"plot:   {clean(plot)}")
    if result["plot_error"]:
        print(clean(result["plot_error"]), file=sys.stderr)
    points = result["points"]  # what was skipped while reading them is in the markdown's notes
    failed = [p for p in points if not p.ok]
    summary = f"{len(points) - len(failed)} of {len(points)} points measured"
    print(summary + (f", {len(failed)} failed" if failed else ""))
    return 0 if len(failed) < len(points) else 1


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when at least one point was measured, 1 when none was (or an internal error), 2 on bad arguments."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
