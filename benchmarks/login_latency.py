"""Wall time of a LUMI dry run against the floor `python -c "import hydra, submitit"` (median of N runs).

    python benchmarks/login_latency.py [--repeats 15]

Target (issue 2): the dry run takes at most 1.5x the floor. Both are measured in this run, alternating, so that
machine load affects them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = [sys.executable, "-c", "import hydra, submitit"]
DRY_RUN = [sys.executable, "-m", "launcher", "+cluster=lumi", "cluster.account=project_465000123", "model=llama-8b",
           "strategy=zero3", "nodes=4", "dry_run=true"]


def timed(command: list[str], cwd: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # A pip install writes bytecode; with PYTHONDONTWRITEBYTECODE set, every edited module would be compiled again on
    # each run and the benchmark would time the compiler.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    floors, runs = [], []
    with tempfile.TemporaryDirectory() as cwd:
        timed(DRY_RUN, cwd, env)  # warm the page cache and __pycache__
        for index in range(args.repeats):
            floors.append(timed(FLOOR, cwd, env))
            runs.append(timed(DRY_RUN, cwd, env))
            print(f"\r{index + 1}/{args.repeats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    floor, run = statistics.median(floors), statistics.median(runs)
    print(f"floor  (import hydra, submitit)  median {floor * 1000:7.1f} ms")
    print(f"LUMI dry run (llama-8b, zero3, 4 nodes) median {run * 1000:7.1f} ms")
    print(f"ratio {run / floor:.2f}x (target <= 1.50x)")


if __name__ == "__main__":
    main()
