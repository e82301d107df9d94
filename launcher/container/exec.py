"""Running a task inside the image: the srun payload and the batch-script lines before it (login node, stdlib only).

In the batch script (all of it runs outside the container)::

    <setup: common_setup.sh, cluster.env, the machine's template>
    setup_lines(container, forwarded_env_names(cluster))    # last: after every export it forwards
    srun ... <command_prefix(cluster, ...)> -u -m submitit.core._submit <folder>

where the container part of ``command_prefix`` is ``exec_command``::

    singularity exec [--nv] --bind <binds>,<checkout>,<run dir if not covered> --env PYTHONPATH=<checkout> IMAGE python

How the job's environment gets in (and why):

- No ``--cleanenv``: srun gives every task its own ``SLURM_PROCID``, ``SLURM_LOCALID``, ... which the batch shell
  cannot know in advance, so they must reach the task by the runtime's normal host-environment passthrough.
- Passthrough loses against the image: a variable the image sets (Docker ``ENV``, ``%environment``) wins over the
  host's value (SingularityCE/Apptainer >= 3.6). The variables the job relies on (rendezvous, run directory,
  caches, offline switches, credentials, ``cluster.env``) are therefore forwarded explicitly, with the runtime's
  ``SINGULARITYENV_<NAME>`` / ``APPTAINERENV_<NAME>`` variables, which override the image. The batch script
  exports them from the variables themselves at run time (``export SINGULARITYENV_X="$X"``, only when ``X`` is
  set): the script holds names only, so a token such as ``HF_TOKEN`` or ``WANDB_API_KEY`` stays in the
  environment it came from and is never written into a file.
- Not ``--env NAME=$NAME`` on the srun line: the payload is shell-quoted (``shlex.quote``), so ``$NAME`` would reach
  the runtime literally; left unquoted it would be word-split and open to injection. ``--env`` carries only values
  known when rendering (``PYTHONPATH=<checkout>``).
- Binds known only at run time (``$HF_HOME``) are appended to ``SINGULARITY_BIND`` / ``APPTAINER_BIND``, which the
  runtime merges with ``--bind``, unless a configured bind already covers them.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from launcher.config.schema import ClusterConfig, ContainerConfig
from launcher.rundir import (
    ENV_ATTEMPT, ENV_JOB_END, ENV_MAX_EXCLUSIONS, ENV_MAX_REQUEUES, ENV_RUN_DIR, ENV_SIGNAL_LEAD_S,
)

# Forwarded into the container by name, besides the keys of cluster.env.
FORWARDED_ENV: Tuple[str, ...] = (
    # Rendezvous: computed in the batch shell, where scontrol exists.
    "MASTER_ADDR", "MASTER_PORT",
    # Run directory and requeue bookkeeping (slurm_templates/common_setup.sh).
    ENV_RUN_DIR, ENV_ATTEMPT, ENV_MAX_REQUEUES, ENV_MAX_EXCLUSIONS, ENV_SIGNAL_LEAD_S, ENV_JOB_END,
    # Caches: Hugging Face on project/scratch storage, MIOpen node-local, compiled DeepSpeed/Triton ops.
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR",
    "MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR",
    # Offline switches: the images default them to offline; the job's own value must win.
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE",
    # Credentials: by name only, never written into the script.
    "HF_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    # Interconnect diagnostics (docs/containers.md).
    "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS",
)
# Directories named by these variables are bound when no configured bind covers them.
BIND_VARS: Tuple[str, ...] = ("HF_HOME",)

# A shell variable name (also the rule for a recipe's --build-arg names).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# The banner of the rendered lines. It names the module's path before launcher/container/ became a package; it is
# kept as written because it is part of every rendered batch script (tests/golden/*.sh).
_BANNER = ("# --- container: the job's environment goes in by name; values stay in the environment "
           "(launcher/container.py) ---")


def env_prefix(runtime: str) -> str:
    """``APPTAINER`` for an ``apptainer`` executable, else ``SINGULARITY`` (SingularityCE, and Apptainer's alias)."""
    return "APPTAINER" if Path(runtime).name.startswith("apptainer") else "SINGULARITY"


def _host_path(path: Any, what: str) -> str:
    """``path`` as a bind source: absolute, without a trailing slash, refused if a bind list cannot carry it."""
    text = str(path)
    if not text.startswith("/"):
        raise ValueError(f"{what} {text!r} must be an absolute path")
    bad = [c for c in (",", ":") if c in text] + (["a control character"] if any(ord(c) < 32 for c in text) else [])
    if bad:
        # ',' separates --bind and --env entries, ':' separates a bind's source from its destination.
        raise ValueError(f"{what} {text!r} cannot be bound into a container: it contains {' and '.join(map(repr, bad))}")
    return text.rstrip("/") or "/"


def _same_path_sources(binds: Iterable[str]) -> List[str]:
    """Bind sources mounted at the same path inside (``src`` or ``src:src[:opts]``)."""
    sources = []
    for spec in binds:
        parts = spec.split(":")
        if len(parts) == 1 or parts[1] in ("", parts[0]):
            sources.append(parts[0].rstrip("/") or "/")
    return sources


def covered(path: str, binds: Iterable[str]) -> bool:
    """Whether ``path`` is visible at the same place inside the container through one of ``binds``."""
    return any(path == src or path.startswith(src.rstrip("/") + "/") for src in _same_path_sources(binds))


def exec_command(container: ContainerConfig, *, code_dir: Optional[Path], paths: Sequence[Any] = ()) -> List[str]:
    """The argv that starts the container's python: ``[runtime, "exec", gpu_flag?, "--bind", ..., "--env",
    "PYTHONPATH=<code_dir>"?, image, *python]``.

    ``code_dir`` (a checkout, or None for an installed package) is bound and put on PYTHONPATH; ``paths`` are
    other host paths the task reads or writes (the run directory, data), bound when no configured bind covers
    them. ``container.python`` is split like a shell word list (``"python3 -X faulthandler"`` works).
    """
    args = [str(container.runtime), "exec"]
    if container.gpu_flag:
        args.append(str(container.gpu_flag))
    binds = [str(b) for b in container.binds]
    for spec in binds:
        if "," in spec or any(ord(c) < 32 for c in spec):
            raise ValueError(f"cluster.container.binds entry {spec!r}: one path per entry, no commas")
    extra = ([_host_path(code_dir, "the checkout")] if code_dir is not None else [])
    extra += [_host_path(p, "the path") for p in paths]
    for path in extra:
        if not covered(path, binds):
            binds.append(path)
    if binds:
        args += ["--bind", ",".join(binds)]
    if code_dir is not None:
        args += ["--env", f"PYTHONPATH={extra[0]}"]
    args += [str(container.image), *shlex.split(container.python or "python")]
    return args


def _forward_lines(prefix: str, names: Sequence[str]) -> List[str]:
    """A bash loop exporting ``<prefix>ENV_<name>`` from each of ``names`` that is set, wrapped at 110 columns."""
    rows, row = [], "for launcher_var in"
    for name in names:
        if len(row) + len(name) > 110:
            rows.append(row + " \\")
            row = "    "
        row += " " + name
    return [
        *rows,
        row + "; do",
        f'  if [ -n "${{!launcher_var+x}}" ]; then export "{prefix}ENV_${{launcher_var}}=${{!launcher_var}}"; fi',
        "done",
        "unset launcher_var",
    ]


def _bind_lines(prefix: str, var: str, covered_patterns: str) -> List[str]:
    """Bash lines appending ``$var`` to ``<prefix>_BIND`` unless a ``case`` pattern of the configured binds covers it."""
    lines = [
        f"# ${var} must be visible inside: bound unless a configured bind covers it",
        f'if [ -n "${{{var}:-}}" ]; then',
        f'  mkdir -p "${var}"',
        f'  case "${var}" in',
        f'    *,*|*:*) echo "launcher: {var}=${var} cannot be bound (comma or colon)" >&2 ;;',
    ]
    if covered_patterns:
        lines.append(f"    {covered_patterns}) ;;")
    # Already in the list (a job resubmitted around a bad node inherits the first one's environment): keep it once.
    lines.append(f'    *) case ",${{{prefix}_BIND:-}}," in *",${var},"*) ;; '
                 f'*) export {prefix}_BIND="${{{prefix}_BIND:+${prefix}_BIND,}}${var}" ;; esac ;;')
    return lines + ["  esac", "fi"]


def setup_lines(container: ContainerConfig, env_names: Sequence[str], *,
                bind_vars: Sequence[str] = BIND_VARS) -> List[str]:
    """Batch-script lines (bash, outside the container, after every export they forward) that pass ``env_names``
    into the container by name and bind the directories named by ``bind_vars`` when not covered."""
    prefix = env_prefix(str(container.runtime))
    names: List[str] = []
    for name in [*env_names, *bind_vars]:
        if not ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        if name not in names:
            names.append(name)
    lines = [_BANNER, *_forward_lines(prefix, names)]
    sources = _same_path_sources(str(b) for b in container.binds)
    covered_patterns = "|".join(f"{shlex.quote(s)}|{shlex.quote(s)}/*" for s in sources if s != "/")
    for var in bind_vars:
        lines += _bind_lines(prefix, var, covered_patterns)
    return lines


def forwarded_env_names(cluster: ClusterConfig) -> List[str]:
    """What ``setup_lines`` forwards for a cluster profile: ``FORWARDED_ENV`` and the keys of ``cluster.env``."""
    names = list(FORWARDED_ENV)
    for name in cluster.env:
        if name not in names:
            names.append(str(name))
    return names


def batch_setup_lines(cluster: ClusterConfig) -> List[str]:
    """The container's setup lines for a cluster profile; none without a container."""
    container = cluster.container
    return setup_lines(container, forwarded_env_names(cluster)) if container else []


def command_prefix(cluster: ClusterConfig, *, code_dir: Optional[Path], paths: Sequence[Any] = ()) -> str:
    """The shell text srun starts on each task (followed by ``-u -m submitit.core._submit <folder>``): the
    container's python, or without a container ``cluster.python`` (each word quoted: data, never shell syntax),
    else this interpreter."""
    container = cluster.container
    if not container:
        return shlex.join(shlex.split(cluster.python)) if cluster.python else shlex.quote(sys.executable)
    return " ".join(shlex.quote(arg) for arg in exec_command(container, code_dir=code_dir, paths=paths))
