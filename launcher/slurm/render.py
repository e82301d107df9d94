"""The batch script: submitit's own rendering, fed with the cluster profile and the templates.

The dry run prints exactly what submission writes: both go through ``submitit_parameters`` and submitit's
``_make_sbatch_string``. Every config value that reaches the shell passes through ``shlex.quote``.
"""

from __future__ import annotations

import shlex
import string
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher import container as containers
from launcher.plan.job import JobPlan, job_name
from launcher.config.schema import ClusterConfig, LauncherConfig
from launcher.paths import PACKAGE_DIR, TEMPLATES_DIR
from launcher.plan.billing import is_whole_node, job_memory
from launcher.rundir import TEMPLATE_VALUES, read_excluded_nodes


class _ShellTemplate(string.Template):
    # '@{name}' never clashes with the shell's own '${name}'.
    delimiter = "@"


def read_template(name: str, **values: Any) -> List[str]:
    """A template of slurm_templates/ with its placeholders replaced by shell-quoted values."""
    text = (TEMPLATES_DIR / name).read_text()
    # The run-directory contract's names (shell-safe words) are available to every template.
    quoted = {key: shlex.quote(str(value)) for key, value in {**TEMPLATE_VALUES, **values}.items()}
    return _ShellTemplate(text).substitute(quoted).rstrip("\n").split("\n")


def setup_lines(cfg: LauncherConfig, plan: JobPlan) -> List[str]:
    cluster = cfg.cluster
    lines = read_template("common_setup.sh", run_dir=plan.run_dir, max_requeues=cluster.max_requeues,
                          max_node_exclusions=cluster.max_node_exclusions,
                          signal_lead_s=cluster.signal_lead_s)
    if cluster.env:
        lines.append("# --- cluster.env ---")
        lines += [f"export {name}={shlex.quote(str(value))}" for name, value in cluster.env.items()]
    if cluster.setup_template:
        lines += read_template(cluster.setup_template, run_dir=plan.run_dir, hf_home=cluster.hf_home)
    # Last: forwards variables set above (MASTER_ADDR, HF_HOME, ...) into the container by name.
    lines += containers.batch_setup_lines(cluster)
    return lines


def teardown_lines(cluster: ClusterConfig) -> List[str]:
    """The machine's cleanup (before the exit code is read), then the common requeue logic (which exits)."""
    lines = ["launcher_rc=$?"] if cluster.teardown_template else []
    if cluster.teardown_template:
        lines += read_template(cluster.teardown_template)
        lines += ["(exit \"$launcher_rc\")"]  # common_teardown.sh reads the training step's exit code from $?
    return lines + read_template("common_teardown.sh")


def code_dir() -> Path | None:
    """The checkout holding ``launcher`` when it is not installed (then it is bound into the container)."""
    root = PACKAGE_DIR.parent
    return None if root.name in ("site-packages", "dist-packages") else root


def python_command(cfg: LauncherConfig, plan: JobPlan) -> str:
    """What srun starts on each task: the container's python, binding the code, the run directory and the inputs the
    job reads (when no profile bind covers them), or a plain one."""
    return containers.command_prefix(cfg.cluster, code_dir=code_dir(), paths=[plan.run_dir, *input_paths(cfg)])


def input_paths(cfg: LauncherConfig) -> List[Path]:
    """The data, model, tokenizer and cache paths the job opens; bundled examples travel with the code."""
    paths = [cfg.data.path, cfg.data.cache_dir, cfg.model.pretrained, cfg.model.tokenizer]
    resolved = [Path(p).expanduser().absolute() for p in paths if p]
    return [p for p in resolved if not p.is_relative_to(PACKAGE_DIR)]


def srun_args(cluster: ClusterConfig) -> List[str]:
    # One failed rank ends the step instead of leaving the others hanging in a collective. srun is given
    # --cpus-per-task itself: Slurm 22.05-23.02 do not pass sbatch's value on to srun.
    args = ["--kill-on-bad-exit=1", f"--cpus-per-task={cluster.cpus_per_task}"]
    if cluster.cpu_bind:
        args.append(f"--cpu-bind={cpu_bind(cluster)}")
    if cluster.gpu_bind:
        args.append(f"--gpu-bind={cluster.gpu_bind}")
    return args


def cpu_bind(cluster: ClusterConfig) -> str:
    """Explicit core masks are only valid on a whole node (LUMI): a shared allocation binds to its own cores."""
    bind = cluster.cpu_bind
    whole_node = is_whole_node(cluster) and cluster.gpus_requested == cluster.gpus_per_node
    if bind.startswith(("mask_cpu", "map_cpu")) and not whole_node:
        return "cores"
    return bind


def submitit_parameters(cfg: LauncherConfig, plan: JobPlan) -> Dict[str, Any]:
    """SlurmExecutor.update_parameters(**this): one definition for the dry run and the submission."""
    cluster = cfg.cluster
    params: Dict[str, Any] = {
        "job_name": job_name(plan.run_name),
        "partition": cluster.partition,
        "time": max(1, plan.walltime_s // 60),
        "nodes": plan.nodes,
        "ntasks_per_node": plan.tasks_per_node,
        "cpus_per_task": plan.cpus_per_task,
        "signal_delay_s": cluster.signal_lead_s,
        "stderr_to_stdout": True,
        "setup": setup_lines(cfg, plan),
        "teardown": teardown_lines(cluster),
        "srun_args": srun_args(cluster),
        # submitit's default wckey is a constant "submitit": leave Slurm's default instead.
        "wckey": None,
        "additional_parameters": {"requeue": True, **{k: str(v) for k, v in cluster.sbatch_extra.items()}},
    }
    mem, mem_per_gpu = job_memory(cluster)
    optional = {
        "account": cluster.account,
        "qos": cluster.qos,
        "gpus_per_node": plan.gpus_per_node or None,
        "mem": mem,
        "mem_per_gpu": mem_per_gpu,
        "exclusive": True if is_whole_node(cluster) else None,
        "exclude": excluded_nodes(cluster.exclude_nodes, plan.run_dir),
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    return params


def excluded_nodes(configured: Optional[str], run_dir: Path) -> Optional[str]:
    """``cluster.exclude_nodes`` plus the nodes earlier faults of this run were resubmitted without
    (``logs/excluded_nodes``): resubmitting the same command never lands on a known-bad node again."""
    names = [n for n in (configured or "").split(",") if n]
    names += [host for host in read_excluded_nodes(run_dir) if host not in names]
    return ",".join(names) or None


def submit_command(python: str, folder: Path) -> str:
    """The srun payload, as submitit writes it (the pickled task is read back from folder)."""
    return f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def render_script(cfg: LauncherConfig, plan: JobPlan) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    params = submitit_parameters(cfg, plan)
    command = submit_command(python_command(cfg, plan), plan.slurm_folder)
    return _make_sbatch_string(command=command, folder=plan.slurm_folder, **params)
