"""The rendered batch scripts: golden files for LUMI and Leonardo, and what a correct job needs.

Regenerate the golden files after an intended change:  UPDATE_GOLDEN=1 python -m pytest tests/test_render.py
then review the diff of tests/golden/ before committing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import launcher.slurm.render
from launcher.plan.job import make_plan
from launcher.slurm.render import render_script
from login_helpers import assert_matches_golden, LEONARDO_ACCOUNT, LUMI_ACCOUNT, config

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "lumi_zero3_4nodes.sh": ["+cluster=lumi", LUMI_ACCOUNT, "model=llama-8b", "strategy=zero3", "nodes=4",
                             "cluster.time=12:00:00", "output_dir=/scratch/project_465000123/runs"],
    "lumi_smallg_lora.sh": ["+cluster=lumi", LUMI_ACCOUNT, "model=llama-1b", "peft=lora", "cluster.partition=small-g",
                            "cluster.time=00:30:00", "output_dir=/scratch/project_465000123/runs"],
    "leonardo_fsdp_2nodes.sh": ["+cluster=leonardo", LEONARDO_ACCOUNT, "model=mistral-7b", "strategy=fsdp", "nodes=2",
                                "cluster.container.image=/leonardo_work/EUHPC_D35_189/launcher.sif",
                                "output_dir=/leonardo_work/EUHPC_D35_189/runs"],
    "leonardo_dbg_zero2.sh": ["+cluster=leonardo", LEONARDO_ACCOUNT, "strategy=zero2", "cluster.qos=boost_qos_dbg",
                              "cluster.time=00:20:00", "cluster.container.image=/leonardo_work/EUHPC_D35_189/l.sif",
                              "output_dir=/leonardo_work/EUHPC_D35_189/runs", "cluster.signal_lead_s=300"],
}


@pytest.fixture(autouse=True)
def fixed_code_dir(monkeypatch):
    # The checkout's location differs between machines; the golden files use a fixed one.
    monkeypatch.setattr(launcher.slurm.render, "code_dir", lambda: Path("/opt/launcher-src"))


def rendered(overrides):
    cfg = config(overrides)
    return render_script(cfg, make_plan(cfg))


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_script(name):
    script = rendered(CASES[name])
    assert_matches_golden(GOLDEN / name, script)


def test_lumi_script_has_what_lumi_needs():
    script = rendered(CASES["lumi_zero3_4nodes.sh"])
    assert "#SBATCH --account=project_465000123" in script
    assert "#SBATCH --ntasks-per-node=8" in script and "#SBATCH --cpus-per-task=7" in script
    assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --nodes=4" in script
    assert "--cpu-bind=mask_cpu:0x00fe000000000000,0xfe00000000000000,0x0000000000fe0000," in script
    assert "export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3" in script
    assert 'export MIOPEN_USER_DB_PATH="/tmp/' in script and "MIOPEN_CUSTOM_CACHE_DIR" in script
    assert "--ntasks-per-node=1 mkdir -p" in script  # the cache made once per node
    setup, command = script.split("# command")
    assert "scontrol show hostnames" in setup and "MASTER_PORT=$(( 10000 + SLURM_JOB_ID % 10000 ))" in setup
    assert "singularity exec" in command and "--bind /var/spool/slurmd,/opt/cray" in command
    assert "HF_HUB_OFFLINE=1" in setup and "#SBATCH --signal=USR2@600" in script
    assert "scontrol requeue" in script.split("# teardown")[1]


def test_leonardo_script_has_what_leonardo_needs():
    script = rendered(CASES["leonardo_fsdp_2nodes.sh"])
    for line in ("#SBATCH --account=EUHPC_D35_189", "#SBATCH --partition=boost_usr_prod", "#SBATCH --qos=normal",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --nodes=2", "export NCCL_IB_TIMEOUT=23", "export TRANSFORMERS_OFFLINE=1"):
        assert line in script, line
    assert "singularity exec --nv" in script
    assert "--bind /leonardo_scratch,/leonardo,/leonardo_work" in script
    assert "CUDA_VISIBLE_DEVICES" not in script  # Slurm's own GPU binding is kept


def test_sbatch_lines_never_contain_shell_variables():
    # sbatch does not expand variables in #SBATCH lines (a known defect of some peers' scripts).
    for overrides in CASES.values():
        for line in rendered(overrides).splitlines():
            if line.startswith("#SBATCH"):
                assert "$" not in line, line


def test_core_masks_need_a_whole_node_else_bind_to_cores():
    whole = rendered(CASES["lumi_zero3_4nodes.sh"])
    assert "--cpu-bind=mask_cpu:" in whole and "--cpus-per-task=7" in whole.split("# command")[1]
    shared = rendered(["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g", "cluster.gpus_per_node_requested=2",
                       "cluster.tasks_per_node=2", "cluster.exclusive=false", "output_dir=/scratch/p/runs"])
    assert "--cpu-bind=cores" in shared and "mask_cpu" not in shared


def test_the_batch_script_and_the_job_derive_the_same_rendezvous_port(tmp_path) -> None:
    """One MASTER_PORT rule: the rendered shell arithmetic equals launcher.rundir.master_port."""
    import shlex
    import subprocess

    from launcher.rundir import TEMPLATE_VALUES, master_port
    from launcher.slurm.render import read_template

    assert all(shlex.quote(value) == value for value in TEMPLATE_VALUES.values())  # safe inside quotes
    line = next(line for line in read_template("common_setup.sh", run_dir=tmp_path, max_requeues=1, signal_lead_s=1)
                if line.startswith("export MASTER_PORT="))
    for job_id in ("123456", "9999", "40000"):
        out = subprocess.run(["bash", "-c", f"{line}; echo $MASTER_PORT"], env={"SLURM_JOB_ID": job_id},
                             capture_output=True, text=True, check=True).stdout
        assert int(out) == master_port(job_id)
