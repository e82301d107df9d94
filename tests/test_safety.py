"""Hostile config values run nothing; the dry run never imports the training stack; no sbatch fails fast."""

from __future__ import annotations

import os
import shlex
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.plan.job import make_plan
from launcher.slurm.render import render_script
from launcher.config.validation import validate
from login_helpers import LUMI_ACCOUNT, config, run_launcher

HOSTILE = [
    "a b'c\"d",
    "x; touch {pwn}/semicolon; echo",
    "$(touch {pwn}/dollar)",
    "`touch {pwn}/backtick`",
    "x' ; touch {pwn}/quote ; echo '",
    "${{IFS}}touch${{IFS}}{pwn}/ifs",
    "a && touch {pwn}/and | cat",
]

STUB = """#!/bin/bash
# Records how it was called, one shell-quoted argument per line.
printf '%s\\n' "$0" "$@" >> "$STUB_LOG"
case "$(basename "$0")" in scontrol) echo node001 ;; esac
"""


def stub_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        path = bin_dir / name
        path.write_text(STUB)
        path.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_run_name_and_paths_run_nothing(tmp_path, template):
    pwn = tmp_path / "pwn"
    pwn.mkdir()
    value = template.format(pwn=pwn)
    output_dir = tmp_path / value.replace("/", "_")
    cfg = config(["+cluster=local_slurm"])
    cfg.run_name = value.replace("/", "_")
    cfg.output_dir = str(output_dir)
    cfg.cluster.env["LABEL"] = value
    cfg.cluster.partition = "debug"
    validate(dataclasses.asdict(cfg))
    plan = make_plan(cfg)
    script = tmp_path / "job.sh"
    script.write_text(render_script(cfg, plan))
    env = {"PATH": f"{stub_bin(tmp_path)}:/usr/bin:/bin", "STUB_LOG": str(tmp_path / "calls.log"),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node001", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert list(pwn.iterdir()) == [], "a config value ran a command"
    # The value reached the job intact, as data.
    assert (plan.run_dir / "logs" / "attempts.log").exists()
    calls = (tmp_path / "calls.log").read_text()
    assert str(plan.slurm_folder) in calls


def test_hostile_run_name_through_the_command_line(tmp_path):
    pwn = tmp_path / "pwn"
    pwn.mkdir()
    name = f"x; touch {pwn}/cli; $(touch {pwn}/cli2)".replace("/", "_")
    done = run_launcher(["+cluster=local_slurm", f"run_name='{name}'", "dry_run=true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"export LAUNCHER_RUN_DIR={shlex.quote(str(tmp_path / 'runs' / name))}" in done.stdout
    assert list(pwn.iterdir()) == []


def test_newline_in_run_name_is_refused_before_rendering():
    from launcher.errors import ConfigError

    with pytest.raises(ConfigError):
        config(["run_name='ok\ntouch /tmp/pwned'"])


def test_dry_run_imports_no_training_stack(tmp_path):
    poison = tmp_path / "poison"
    for name in ("torch", "transformers", "deepspeed", "peft", "accelerate", "datasets"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('login path imported {name}')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(poison), str(Path(__file__).resolve().parents[1])])}
    for args in (["+cluster=lumi", LUMI_ACCOUNT, "strategy=zero3", "model=llama-8b", "nodes=4"],
                 ["+cluster=leonardo", "cluster.account=EUHPC_D35_189", "peft=lora"],
                 []):
        done = subprocess.run([sys.executable, "-m", "launcher", *args, "dry_run=true"], cwd=tmp_path,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "dry run" in done.stdout


def test_dry_run_writes_the_script_into_the_run_dir(tmp_path):
    done = run_launcher(["+cluster=lumi", LUMI_ACCOUNT, "run_name=first", "dry_run=true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    script = (tmp_path / "runs" / "first" / "job.sh").read_text()
    assert script in done.stdout
    assert "cost        4.00 GPU-hours" in done.stdout and "world size  8" in done.stdout


def test_submission_without_sbatch_fails_at_once_suggesting_dry_run(tmp_path):
    done = run_launcher(["+cluster=lumi", LUMI_ACCOUNT], cwd=tmp_path, env={"PATH": str(tmp_path / "no-slurm-here")})
    assert done.returncode == 2
    assert "sbatch" in done.stderr and "dry_run=true" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_validation_error_exits_2_with_the_field(tmp_path):
    done = run_launcher(["+cluster=lumi", "dry_run=true"], cwd=tmp_path)
    assert done.returncode == 2 and "cluster.account" in done.stderr and "Traceback" not in done.stderr


def test_tokens_in_the_environment_never_reach_files(tmp_path):
    token = "hf_" + "Zz9" * 12
    done = run_launcher(["+cluster=lumi", LUMI_ACCOUNT, "run_name=t", "dry_run=true"], cwd=tmp_path,
                        env={"HF_TOKEN": token})
    assert done.returncode == 0
    assert token not in done.stdout + done.stderr
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert token not in path.read_text()
