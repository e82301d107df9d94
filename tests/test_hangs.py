"""Hangs and stragglers (issue 18, docs/hangs.md): the watchdog, the test hooks, status, the straggler report.

Units first (no processes), then 2-rank CPU runs through torchrun (tests/conftest.py's TrainLauncher): a rank hung at
step 5 in a collective and in a sleep (``train.hang_timeout_s=20``), and a rank sleeping 50% longer per step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest

from launcher import rundir
from launcher.config import compose
from launcher.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# -- units ------------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_derived_timeout_startup_then_steps_then_saves(tmp_path: Path) -> None:
    from launcher.train import watchdog as W

    clock = FakeClock()
    dog = W.Watchdog(tmp_path, rank=0, world_size=2, timeout_s=None, attempt=1, clock=clock)
    assert dog.timeout_s() == W.STARTUP_S
    for step in range(1, 12):
        clock.now += 40.0
        dog.beat(step)
    assert dog.timeout_s() == 20 * 40.0  # 20 x the median step, above the 600 s floor
    with dog.phase("save"):
        assert dog.timeout_s() == W.STARTUP_S  # no save measured yet
        clock.now += 500.0
    assert dog.longest["save"] == 500.0 and dog.last_progress == clock.now
    with dog.phase("save"):
        assert dog.timeout_s() == 3 * 500.0
    fixed = W.Watchdog(tmp_path, rank=0, world_size=2, timeout_s=20, attempt=1, clock=clock)
    assert fixed.timeout_s() == 20


def test_fire_writes_header_stacks_node_and_exits(tmp_path: Path) -> None:
    from launcher.train import watchdog as W

    codes: List[int] = []
    dog = W.Watchdog(tmp_path, rank=1, world_size=1, timeout_s=20, attempt=3, exit_fn=codes.append)
    dog.beat(4)
    dog.set_phase("data")
    dog.culprit = "test"
    path = dog.fire("no optimizer step completed within 20s")
    assert codes == [rundir.EXIT_HANG] and path == tmp_path / "hangs" / "attempt-3" / "rank-1.txt"
    header = W.read_header(path)
    assert header["last completed step"] == "4" and header["stopped in step"] == "5"
    assert header["phase"].startswith("data") and header["cause"] == "test"
    assert "test_fire_writes_header_stacks_node_and_exits" in path.read_text()  # this thread's stack
    assert (path.parent / rundir.HANG_NODE_FILE).read_text().strip() == dog.host


def test_peer_file_makes_the_others_fire(tmp_path: Path) -> None:
    from launcher.train import watchdog as W

    dog = W.Watchdog(tmp_path, rank=0, world_size=2, timeout_s=1000, attempt=1)
    assert dog.peer_fired() is None
    stale = dog.dir / "rank-1.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    import os

    os.utime(stale, (dog.started_wall - 100, dog.started_wall - 100))  # an earlier run's hang: ignored
    assert dog.peer_fired() is None
    stale.write_text("new")
    assert dog.peer_fired() == 1


def test_preflight_failure_names_one_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.train import watchdog as W

    monkeypatch.setenv(rundir.ENV_ATTEMPT, "2")
    fail = SimpleNamespace(ranks=[2, 3], message="rank 2: no GPU")
    records = [{"rank": r, "host": f"node{r // 2}"} for r in range(4)]
    report = SimpleNamespace(failures=[fail], records=records)
    assert W.record_preflight_failure(tmp_path, report, rank=0) == "node1"
    assert (rundir.hang_dir(tmp_path, 2) / "node").read_text() == "node1\n"
    spread = SimpleNamespace(failures=[SimpleNamespace(ranks=[0, 3], message="slow")], records=records)
    assert W.preflight_fault_hosts(spread) == ["node0", "node1"]
    assert W.preflight_fault_hosts(SimpleNamespace(failures=[SimpleNamespace(ranks=[], message="x")],
                                                   records=records)) == []


def test_own_step_times_find_the_late_rank() -> None:
    from launcher.train.stragglers import StragglerStreak, own_step_times, straggler_summary

    # rank 1 finishes every step 0.5 s after rank 0; steps take 1.5 s (the slow rank's time)
    times = [[10 + 1.5 * k for k in range(6)], [10.5 + 1.5 * k for k in range(6)]]
    own = own_step_times(times)
    assert own == pytest.approx([1.0, 1.5])
    summary = straggler_summary(own + [1.0], ["a", "b", "c"])  # 1.5 over the median of the others (1.0)
    assert summary["slowest_rank"] == 1 and summary["slowest_host"] == "b"
    assert summary["straggler_ratio"] == pytest.approx(1.5)
    streak = StragglerStreak(1.2)
    assert [bool(streak.update(summary)) for _ in range(4)] == [False, False, True, False]


def test_new_keys_are_validated() -> None:
    from launcher.config.validation import validate

    cfg = compose(["model=tiny", "data=corpus", "run_name=x"])
    assert cfg.train.hang_timeout_s is None and cfg.train.straggler_ratio == 1.2
    for bad in ("train.hang_timeout_s=-1", "train.straggler_ratio=1", "train.debug_hang_in=disk"):
        key, value = bad.split("=")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(compose(["model=tiny", "data=corpus", "run_name=x", bad]))


# -- 2 ranks through torchrun -----------------------------------------------------------------------------------------

HANG_OVERRIDES = ["train.hang_timeout_s=20", "train.debug_hang_at_step=5", "train.max_steps=30",
                  "train.preflight=false", "train.export=false"]


def _hang_run(train_launcher, name: str, where: str) -> tuple:
    run_dir = train_launcher.make_run(name, [*HANG_OVERRIDES, f"train.debug_hang_in={where}"])
    started = time.time()
    result = train_launcher.torchrun(run_dir, timeout=240)
    return run_dir, result, time.time() - started


@pytest.mark.parametrize("where", ["collective", "sleep"])
def test_hung_rank_is_caught(train_launcher, where: str) -> None:
    run_dir, result, _ = _hang_run(train_launcher, f"hang-{where}", where)
    ended = time.time()
    assert result.returncode != 0, result.stderr[-3000:]
    steps = [r["step"] for r in json.loads("[" + ",".join(
        line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()) + "]") if "loss" in r]
    assert max(steps) == 4
    hang_started = (run_dir / "metrics.jsonl").stat().st_mtime  # the step-4 line: the hang starts right after
    assert ended - hang_started < 20 + 60
    hangs = rundir.hang_dir(run_dir, 1)
    stacks = {p.name: p.read_text() for p in hangs.glob("rank-*.txt")}
    assert set(stacks) == {"rank-0.txt", "rank-1.txt"}, result.stderr[-3000:]
    hung = stacks["rank-1.txt"]
    assert "stopped in step: 5" in hung and "in _hang" in hung
    assert f"phase: {where}" in hung
    assert ("all_reduce" in hung) == (where == "collective")
    assert (hangs / "node").read_text().strip()
    status = subprocess.run([sys.executable, "-m", "launcher.status", str(run_dir), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    row = json.loads(status.stdout)["runs"][0]
    assert row["hang"]["step"] == 5 and row["hang"]["rank"] == 1
    assert row["hang"]["file"] == str(hangs / "rank-1.txt")
    table = subprocess.run([sys.executable, "-m", "launcher.status", str(run_dir)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert "HUNG at step 5" in table.stdout and str(hangs / "rank-1.txt") in table.stderr


def test_straggler_report(train_launcher) -> None:
    run_dir = train_launcher.make_run("straggler", [
        "train.max_steps=30", "train.preflight=false", "train.export=false", "train.debug_step_sleep_s=0.2",
        "train.debug_slow_rank=1", "train.debug_slow_factor=1.5", "train.straggler_every=5", "train.eval_every=100",
        "train.save_every=100",
    ])
    result = train_launcher.torchrun(run_dir, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    from tests.conftest import records

    reports = [r for r in records(run_dir) if r.get("event") == "stragglers"]
    assert [r["step"] for r in reports] == [5, 10, 15, 20, 25, 30]
    for report in reports:
        assert report["slowest_rank"] == 1 and report["slowest_host"]
        assert 1.2 < report["straggler_ratio"] < 1.8
    assert "straggler_warning" in reports[2] and "straggler: rank 1" in result.stdout
    status = subprocess.run([sys.executable, "-m", "launcher.status", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert "straggler: rank 1" in status.stdout
