"""Multirun: swept keys, deterministic point names, the summary at the end (dry runs: no Slurm needed)."""

from __future__ import annotations

from launcher.config.sweep import name_sweep_point, point_suffix, swept_keys
from login_helpers import LUMI_ACCOUNT, run_launcher


def test_swept_keys_are_those_with_several_values():
    argv = ["-m", "+cluster=lumi", "nodes=1,2", "strategy=zero2,zero3", "train.lr=range(1,3)",
            "peft.target_modules=[q_proj,v_proj]", "data.path='a,b.txt'"]
    assert swept_keys(argv) == ["nodes", "strategy", "train.lr"]


def test_point_names_use_the_swept_values_only():
    assert point_suffix(["+cluster=lumi", "strategy=zero3", "nodes=2"], ["nodes", "strategy"]) == "nodes=2+strategy=zero3"
    cfg = {"run_name": "bench"}
    named = name_sweep_point(cfg, ["-m", "nodes=1,2"], ["nodes=2", "train.lr=0.1"])
    assert named["run_name"] == "bench__nodes=2"
    assert name_sweep_point(cfg, ["-m", "run_name=a,b"], ["run_name=a"]) is cfg  # named explicitly


def test_dry_run_sweep_writes_one_script_per_point_and_a_summary(tmp_path):
    done = run_launcher(["-m", "+cluster=lumi", LUMI_ACCOUNT, "run_name=bench", "nodes=1,2",
                         "strategy=zero2,zero3", "dry_run=true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    points = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != ".sweeps")
    assert points == ["bench__nodes=1+strategy=zero2", "bench__nodes=1+strategy=zero3",
                      "bench__nodes=2+strategy=zero2", "bench__nodes=2+strategy=zero3"]
    assert all((tmp_path / "runs" / p / "job.sh").is_file() for p in points)
    assert "launcher: sweep of 4 points" in done.stdout
    assert "#SBATCH --nodes=2" in (tmp_path / "runs" / points[2] / "job.sh").read_text()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    # Nothing outside output_dir: Hydra's sweep record sits beside the runs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert list((tmp_path / "runs" / ".sweeps").glob("*/multirun.yaml"))


def test_a_bad_point_stops_the_sweep_before_anything_is_written(tmp_path):
    done = run_launcher(["-m", "+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "nodes=1,2,5",
                         "dry_run=true"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("launcher: error: nodes=5: sweep point #2 of 3")  # one line, the point named
    assert "1..4 on cluster.partition=small-g" in done.stderr
    assert list(tmp_path.iterdir()) == []  # not even the first two points' scripts
