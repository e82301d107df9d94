"""The rendered batch scripts: golden files for LUMI and Leonardo, and what a correct job needs.

Regenerate the golden files after an intended change:  UPDATE_GOLDEN=1 python -m pytest tests/test_render.py
then review the diff of tests/golden/ before committing it.
"""

from __future__ import annotations

import subprocess
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
    # Partial nodes (issue 14): no --exclusive, cores and memory in proportion to the GPUs.
    "lumi_smallg_1gcd.sh": ["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g",
                            "cluster.gpus_per_node_requested=1", "output_dir=/scratch/project_465000123/runs"],
    "lumi_smallg_4gcd.sh": ["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=small-g",
                            "cluster.gpus_per_node_requested=4", "output_dir=/scratch/project_465000123/runs"],
    "lumi_devg_2nodes.sh": ["+cluster=lumi", LUMI_ACCOUNT, "cluster.partition=dev-g", "nodes=2", "strategy=zero2",
                            "output_dir=/scratch/project_465000123/runs"],
    "leonardo_1gpu.sh": ["+cluster=leonardo", LEONARDO_ACCOUNT, "cluster.gpus_per_node_requested=1",
                         "cluster.container.image=/leonardo_work/EUHPC_D35_189/l.sif",
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
    assert "--ntasks-per-node=1 bash -c '[ -d \"$1\" ] || { mkdir -p" in script  # the cache made once per node
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
    line = next(line for line in read_template("common_setup.sh", run_dir=tmp_path, max_requeues=1, max_node_exclusions=1,
                                                      signal_lead_s=1)
                if line.startswith("export MASTER_PORT="))
    for job_id in ("123456", "9999", "40000"):
        out = subprocess.run(["bash", "-c", f"{line}; echo $MASTER_PORT"], env={"SLURM_JOB_ID": job_id},
                             capture_output=True, text=True, check=True).stdout
        assert int(out) == master_port(job_id)


# Hand-worked costs of a 1-hour job (issue 14): LUMI small-g/dev-g 0.5 x max(GCDs, ceil(cores/8), ceil(mem/64 GB))
# GPU-hours per node-hour; Leonardo node-hours (a GPU = a quarter node = 8 core-hours).
PARTIAL_NODE_COSTS = {
    "lumi_smallg_1gcd.sh": ("gpu_hours", 0.5 * max(1, -(-7 // 8), -(-60 // 64))),  # 0.5
    "lumi_smallg_4gcd.sh": ("gpu_hours", 0.5 * max(4, -(-28 // 8), -(-240 // 64))),  # 2.0
    "lumi_devg_2nodes.sh": ("gpu_hours", 2 * 0.5 * 8),  # all 8 GCDs of 2 nodes: whole nodes, exclusive: 8.0
    "leonardo_1gpu.sh": ("node_hours", 1 / 4),  # 8 cores, 120 GB: one quarter of a node
    "leonardo_dbg_zero2.sh": ("node_hours", 1 * 20 / 60),  # 4 GPUs for 20 minutes: a whole node
}


@pytest.mark.parametrize("name", sorted(PARTIAL_NODE_COSTS))
def test_partial_nodes_ask_for_their_share_and_pay_for_it(name):
    cfg = config(CASES[name])
    plan = make_plan(cfg)
    script = render_script(cfg, plan)
    unit, cost = PARTIAL_NODE_COSTS[name]
    assert (plan.billing_unit, plan.billing_units) == (unit, pytest.approx(cost))
    gpus = plan.gpus_per_node
    whole = gpus == cfg.cluster.gpus_per_node
    assert ("#SBATCH --exclusive" in script) == whole
    assert f"#SBATCH --gpus-per-node={gpus}" in script and f"#SBATCH --ntasks-per-node={gpus}" in script
    assert f"#SBATCH --cpus-per-task={cfg.cluster.cpus_per_task}" in script  # cores in proportion to the GPUs
    if not whole:
        assert f"#SBATCH --mem-per-gpu={cfg.cluster.mem_per_gpu}" in script and "#SBATCH --mem=" not in script


def test_leonardo_summary_shows_core_hours_and_an_exclusive_share_warns():
    from launcher.plan.summary import cluster_summary

    cfg = config(CASES["leonardo_1gpu.sh"])
    assert "0.25 node-hours = 8 core-hours" in cluster_summary(cfg, make_plan(cfg))
    forced = config([*CASES["leonardo_1gpu.sh"], "cluster.exclusive=true"])
    summary = cluster_summary(forced, make_plan(forced))
    assert "1.00 node-hours = 32 core-hours" in summary and "pays for 3 idle GPUs" in summary


def test_lumi_jobs_bind_libjansson_and_use_gpu_rdma():
    for name in ("lumi_zero3_4nodes.sh", "lumi_smallg_1gcd.sh"):
        script = rendered(CASES[name])
        assert "/usr/lib64/libjansson.so.4" in script and "export NCCL_NET_GDR_LEVEL=PHB" in script
    dropped = rendered([*CASES["lumi_smallg_1gcd.sh"], "~cluster.env.NCCL_NET_GDR_LEVEL"])
    assert "NCCL_NET_GDR_LEVEL" not in dropped  # the documented escape hatch for images that hang with it


def _run_shell(tmp_path: Path, lines: list[str], env: dict[str, str]) -> "subprocess.CompletedProcess[str]":
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"  # one node: drop srun's options and run the command here
    srun.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    return subprocess.run(["bash", "-c", "\n".join(lines)], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})


@pytest.mark.parametrize("existed", [False, True])
def test_lumi_miopen_cache_is_removed_at_the_end_only_if_the_job_created_it(tmp_path, existed):
    import os

    from launcher.slurm.render import read_template, teardown_lines

    job = f"{os.getpid()}{int(existed)}"
    cache = Path(f"/tmp/t-miopen-cache-{job}")
    if existed:
        cache.mkdir()  # someone else's directory of the same name: left alone
    setup = read_template("lumi_setup.sh", hf_home=tmp_path / "hf")
    teardown = [line for line in teardown_lines(config(["+cluster=lumi", LUMI_ACCOUNT]).cluster)
                if "requeue" not in line][:4]
    env = {"SLURM_JOB_ID": job, "SLURM_JOB_NUM_NODES": "1", "USER": "t", "SLURM_JOB_ACCOUNT": "p", "HOME": str(tmp_path)}
    script = [*setup, f'[ -d "{cache}" ] && echo created', "(exit 7)", *teardown, 'echo "rc=$?"',
              f'[ -d "{cache}" ] && echo kept || echo removed']
    try:
        done = _run_shell(tmp_path, script, env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["created", "rc=7", "kept" if existed else "removed"]
    finally:
        if cache.exists():
            import shutil

            shutil.rmtree(cache)


def test_nodes_a_fault_excluded_stay_excluded_when_the_run_is_resubmitted(tmp_path):
    overrides = [*CASES["leonardo_1gpu.sh"], f"output_dir={tmp_path}", "run_name=r", "cluster.exclude_nodes=lrdn0001"]
    assert "#SBATCH --exclude=lrdn0001\n" in rendered(overrides)
    excluded = tmp_path / "r" / "logs" / "excluded_nodes"
    excluded.parent.mkdir(parents=True)
    excluded.write_text("lrdn0042 rank 3: hang at step 5\nlrdn0001 preflight: slow all-reduce\n")
    assert "#SBATCH --exclude=lrdn0001,lrdn0042\n" in rendered(overrides)
