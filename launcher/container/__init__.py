"""Tasks inside an Apptainer/Singularity image, and the image itself (recipes in containers/, docs/containers.md).

Login-node module: stdlib only at import (the build CLI composes the config through Hydra, ``check`` reads package
metadata); it never imports torch.

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

Build side: ``build_command`` and ``python -m launcher.container build +cluster=lumi|leonardo [key=value ...]
[output=PATH] [--build-arg NAME=VALUE ...] [--run]``; inside an image, ``python -m launcher.container check``
verifies that the installed packages satisfy pyproject.toml's ranges (the recipes' %test runs it).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from launcher.paths import CONTAINERS_DIR, PACKAGE_DIR

# Forwarded into the container by name, besides the keys of cluster.env.
FORWARDED_ENV: Tuple[str, ...] = (
    # Rendezvous: computed in the batch shell, where scontrol exists.
    "MASTER_ADDR", "MASTER_PORT",
    # Run directory and requeue bookkeeping (slurm_templates/common_setup.sh).
    "LAUNCHER_RUN_DIR", "LAUNCHER_ATTEMPT", "LAUNCHER_MAX_REQUEUES", "LAUNCHER_SIGNAL_LEAD_S",
    # Caches: Hugging Face on project/scratch storage, MIOpen node-local, compiled DeepSpeed/Triton ops.
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR",
    "MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR",
    # Offline switches: the images default them to offline; the job's own value must win.
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE",
    # Credentials: by name only, never written into the script.
    "HF_TOKEN", "WANDB_API_KEY",
    # Interconnect diagnostics (docs/containers.md).
    "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS",
)
# Directories named by these variables are bound when no configured bind covers them.
BIND_VARS: Tuple[str, ...] = ("HF_HOME",)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TEMPLATE = re.compile(r"{{\s*(\w+)\s*}}")
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*$")


# ---------------------------------------------------------------------------------------------------------------
# Running a task inside the image
# ---------------------------------------------------------------------------------------------------------------


def env_prefix(runtime: str) -> str:
    """``APPTAINER`` for an ``apptainer`` executable, else ``SINGULARITY`` (SingularityCE, and Apptainer's alias)."""
    return "APPTAINER" if Path(runtime).name.startswith("apptainer") else "SINGULARITY"


def _host_path(path: Any, what: str) -> str:
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


def exec_command(container: Mapping[str, Any], *, code_dir: Optional[Path], paths: Sequence[Any] = ()) -> List[str]:
    """The argv that starts the container's python: ``[runtime, "exec", gpu_flag?, "--bind", ..., "--env",
    "PYTHONPATH=<code_dir>"?, image, *python]``.

    ``code_dir`` (a checkout, or None for an installed package) is bound and put on PYTHONPATH; ``paths`` are
    other host paths the task reads or writes (the run directory, data), bound when no configured bind covers
    them. ``container.python`` is split like a shell word list (``"python3 -X faulthandler"`` works).
    """
    args = [str(container["runtime"]), "exec"]
    if container.get("gpu_flag"):
        args.append(str(container["gpu_flag"]))
    binds = [str(b) for b in container.get("binds") or ()]
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
    args += [str(container["image"]), *shlex.split(str(container.get("python") or "python"))]
    return args


def setup_lines(container: Mapping[str, Any], env_names: Sequence[str], *,
                bind_vars: Sequence[str] = BIND_VARS) -> List[str]:
    """Batch-script lines (bash, outside the container, after every export they forward) that pass ``env_names``
    into the container by name and bind the directories named by ``bind_vars`` when not covered."""
    prefix = env_prefix(str(container["runtime"]))
    names: List[str] = []
    for name in [*env_names, *bind_vars]:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        if name not in names:
            names.append(name)
    rows, row = [], "for launcher_var in"
    for name in names:
        if len(row) + len(name) > 110:
            rows.append(row + " \\")
            row = "    "
        row += " " + name
    lines = [
        "# --- container: the job's environment goes in by name; values stay in the environment (launcher/container.py) ---",
        *rows,
        row + "; do",
        f'  if [ -n "${{!launcher_var+x}}" ]; then export "{prefix}ENV_${{launcher_var}}=${{!launcher_var}}"; fi',
        "done",
        "unset launcher_var",
    ]
    sources = _same_path_sources(str(b) for b in container.get("binds") or ())
    covered_patterns = "|".join(f"{shlex.quote(s)}|{shlex.quote(s)}/*" for s in sources if s != "/")
    for var in bind_vars:
        lines += [
            f"# ${var} must be visible inside: bound unless a configured bind covers it",
            f'if [ -n "${{{var}:-}}" ]; then',
            f'  mkdir -p "${var}"',
            f'  case "${var}" in',
            f'    *,*|*:*) echo "launcher: {var}=${var} cannot be bound (comma or colon)" >&2 ;;',
        ]
        if covered_patterns:
            lines.append(f"    {covered_patterns}) ;;")
        lines += [
            f'    *) export {prefix}_BIND="${{{prefix}_BIND:+${prefix}_BIND,}}${var}" ;;',
            "  esac",
            "fi",
        ]
    return lines


def forwarded_env_names(cluster: Mapping[str, Any]) -> List[str]:
    """What ``setup_lines`` forwards for a cluster profile: ``FORWARDED_ENV`` and the keys of ``cluster.env``."""
    names = list(FORWARDED_ENV)
    for name in (cluster.get("env") or {}):
        if name not in names:
            names.append(str(name))
    return names


def batch_setup_lines(cluster: Mapping[str, Any]) -> List[str]:
    """The container's setup lines for a cluster profile; none without a container."""
    container = cluster.get("container")
    return setup_lines(container, forwarded_env_names(cluster)) if container else []


def command_prefix(cluster: Mapping[str, Any], *, code_dir: Optional[Path], paths: Sequence[Any] = ()) -> str:
    """The shell text srun starts on each task (followed by ``-u -m submitit.core._submit <folder>``): the
    container's python, or without a container ``cluster.python`` as written, else this interpreter."""
    container = cluster.get("container")
    if not container:
        return cluster.get("python") or shlex.quote(sys.executable)
    return " ".join(shlex.quote(arg) for arg in exec_command(container, code_dir=code_dir, paths=paths))


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A definition file: header keys (lower case) and section bodies (``post``, ``environment``, ...)."""

    header: Dict[str, str]
    sections: Dict[str, str]
    text: str

    @property
    def arguments(self) -> Dict[str, str]:
        """The ``%arguments`` defaults."""
        out = {}
        for line in self.sections.get("arguments", "").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip()
        return out

    @property
    def template_variables(self) -> List[str]:
        return sorted(set(_TEMPLATE.findall(self.text)))

    @property
    def pins(self) -> Dict[str, str]:
        """``name==version`` lines of ``%post`` (the requirements file it writes), names normalised."""
        pins = {}
        for line in self.sections.get("post", "").splitlines():
            match = _PIN.match(line)
            if match:
                pins[normalize(match.group(1))] = match.group(2)
        return pins


def normalize(name: str) -> str:
    """PEP 503 name: ``Hydra_Core`` and ``hydra-core`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_recipe(path: Path) -> Recipe:
    text = Path(path).read_text()
    header: Dict[str, str] = {}
    sections: Dict[str, str] = {}
    current: Optional[str] = None
    for line in text.splitlines():
        words = line.split()
        if words and words[0].startswith("%"):
            current = words[0][1:].lower()
            sections.setdefault(current, "")
            continue
        if current is None:
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and ":" in stripped:
                key, value = stripped.split(":", 1)
                header[key.strip().lower()] = value.split("#")[0].strip()
        else:
            sections[current] += line + "\n"
    return Recipe(header=header, sections=sections, text=text)


# ---------------------------------------------------------------------------------------------------------------
# Building the image
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildProfile:
    """Where and how a machine builds its image (facts: shared/reference/clusters.md, docs/containers.md)."""

    recipe: str
    flags: Tuple[str, ...] = ()
    # Used when cluster.container.image is missing or read-only; formatted with the cluster's account.
    default_output: Optional[str] = None
    read_only_prefixes: Tuple[str, ...] = ()
    # Printed before the command: where to build, environment to prepare.
    notes: Tuple[str, ...] = ()
    # True: the build must run inside a Slurm job (--run refuses elsewhere unless --here).
    needs_job: bool = False
    job_example: str = ""


BUILD_PROFILES: Dict[str, BuildProfile] = {
    "lumi": BuildProfile(
        recipe="lumi.def",
        default_output="/project/{account}/containers/launcher-lumi.sif",
        read_only_prefixes=("/appl/",),
        notes=(
            "# LUMI: build on a login node. SingularityCE builds unprivileged with proot from the systools module",
            "# (no root, no --fakeroot); the login nodes reach PyPI. Keep images in /project or /scratch, not $HOME.",
            "module load LUMI systools",
            "unset SINGULARITY_BIND SINGULARITY_BINDPATH  # set by LUMI's container modules; unwanted in a build",
            "# room for the unpacked image (tens of GB); $XDG_RUNTIME_DIR (RAM) suits small images only",
            'export SINGULARITY_TMPDIR="/scratch/{account}/$USER/singularity-tmp" '
            'SINGULARITY_CACHEDIR="/scratch/{account}/$USER/singularity-cache"',
            'mkdir -p "$SINGULARITY_TMPDIR" "$SINGULARITY_CACHEDIR"',
        ),
    ),
    "leonardo": BuildProfile(
        recipe="leonardo.def",
        flags=("--fakeroot",),
        notes=(
            "# Leonardo: keep the image in $WORK (or $FAST), not $HOME (50 GB). Pull caches and temporary files on scratch:",
            'export SINGULARITY_TMPDIR="$CINECA_SCRATCH/singularity-tmp" SINGULARITY_CACHEDIR="$CINECA_SCRATCH/singularity-cache"',
            'mkdir -p "$SINGULARITY_TMPDIR" "$SINGULARITY_CACHEDIR"',
        ),
        needs_job=True,
        job_example="srun -A {account} -p lrd_all_serial --time=04:00:00 --cpus-per-task=4 --mem=30000M {command}",
    ),
}

LEONARDO_WARNING = (
    "warning: Leonardo builds do not belong in the login shell (processes are killed after 10 minutes of CPU time).\n"
    "Run the build as a Slurm job. It downloads nvcr.io/nvidia/pytorch and PyPI packages, and the boost compute\n"
    "nodes have no internet: use lrd_all_serial (runs on the login nodes, 4 cores, 30 GB, 4 h), e.g.\n"
    "  {example}\n"
    "or salloc -A {account} -p lrd_all_serial --time=04:00:00 --cpus-per-task=4, then the command inside.\n"
    "If --fakeroot is refused there, build on a machine with Apptainer and copy the .sif to $WORK."
)


class BuildError(ValueError):
    """A build request that cannot work; the message says what to pass instead."""


def build_command(cluster_name: str, container: Optional[Mapping[str, Any]], *, recipe_dir: Path, output: Any,
                  build_args: Optional[Mapping[str, str]] = None, project_dir: Optional[Path] = None) -> List[str]:
    """``[runtime, "build", flags..., "--build-arg", "PROJECT_DIR=<checkout>", ..., output, recipe]``.

    ``build_args`` override the recipe's ``%arguments`` (``BASE_IMAGE`` on LUMI, ``NGC_TAG`` on Leonardo); a name
    the recipe does not define is refused. ``project_dir`` defaults to the checkout holding ``recipe_dir``.
    """
    profile = BUILD_PROFILES.get(cluster_name)
    if profile is None:
        raise BuildError(f"no container recipe for cluster {cluster_name!r} (recipes: {', '.join(sorted(BUILD_PROFILES))})")
    recipe_path = Path(recipe_dir) / profile.recipe
    recipe = read_recipe(recipe_path)
    project = Path(project_dir) if project_dir is not None else Path(recipe_dir).resolve().parent
    if not (project / "pyproject.toml").is_file():
        raise BuildError(f"{project} is not a source checkout (no pyproject.toml): build from a clone of the repository")
    if any(c.isspace() for c in str(project)) or any(c.isspace() for c in str(output)):
        raise BuildError("the checkout and the output path must not contain white space (definition files split on it)")
    extra = dict(build_args or {})
    unknown = sorted(set(extra) - set(recipe.arguments))
    if unknown:
        raise BuildError(f"{profile.recipe} has no argument {', '.join(unknown)} (it has: {', '.join(sorted(recipe.arguments))})")
    runtime = str((container or {}).get("runtime") or "singularity")
    args = [runtime, "build", *profile.flags, "--build-arg", f"PROJECT_DIR={project}"]
    for key, value in extra.items():
        if key != "PROJECT_DIR":
            args += ["--build-arg", f"{key}={value}"]
    return args + [str(output), str(recipe_path)]


def default_output(cluster_name: str, cluster: Mapping[str, Any]) -> str:
    """Where the image goes without ``output=``: the profile's ``container.image`` unless that is read-only (LUMI's
    ``/appl`` base images), else the machine's project location."""
    profile = BUILD_PROFILES[cluster_name]
    image = str(((cluster.get("container") or {}).get("image")) or "")
    # A profile image interpolated from a missing account reads ".../None/...": not a place to build into.
    if image and not image.startswith(profile.read_only_prefixes) and "/None/" not in image:
        return image
    if profile.default_output and cluster.get("account"):
        return profile.default_output.format(account=cluster["account"])
    example = (profile.default_output or "/path/to/launcher-{account}.sif").format(account="<account>")
    raise BuildError(f"cluster.container.image={image or None!r} is not writable: pass output={example}"
                     + (" or cluster.account=<account>" if profile.default_output else ""))


# ---------------------------------------------------------------------------------------------------------------
# Inside the image: installed versions against pyproject.toml
# ---------------------------------------------------------------------------------------------------------------


def project_requirements(extra: Optional[str] = "train") -> List[str]:
    """The base dependencies and those of ``extra``: from pyproject.toml in a checkout, else the installed metadata."""
    pyproject = PACKAGE_DIR.parent / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        project = tomllib.loads(pyproject.read_text())["project"]
        return list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get(extra, []))
    from importlib.metadata import requires

    out = []
    for line in requires("eurohpc-launcher") or []:
        spec, _, marker = line.partition(";")
        if not marker.strip() or (extra and re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", marker)):
            out.append(spec.strip())
    return out


def _packaging():
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    return Requirement


def check_installed(extra: Optional[str] = "train", *, version: Optional[Callable[[str], str]] = None,
                    out=None) -> int:
    """Print each requirement with its installed version; 1 when one is missing or out of range.

    Pre-releases count as matching (NGC images ship torch ``2.7.0a0+...``): ``>=2.6`` accepts 2.7.0a0 but not 2.6.0a0.
    """
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    Requirement = _packaging()
    lookup = version or installed_version
    out = out or sys.stdout
    bad = 0
    for line in project_requirements(extra):
        req = Requirement(line)
        try:
            found = lookup(req.name)
        except PackageNotFoundError:
            found = None
        ok = found is not None and req.specifier.contains(found, prereleases=True)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'}  {req.name:<14} {found or 'missing':<28} wants {req.specifier or 'any'}", file=out)
    print("launcher: installed packages satisfy pyproject.toml" if not bad else
          f"launcher: {bad} package(s) missing or out of range", file=out)
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _parse_build_args(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _NAME.match(key):
            raise BuildError(f"--build-arg {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


def _compose_cluster(overrides: Sequence[str]) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from launcher.config import compose

    cfg = compose(list(overrides))
    if cfg.get("cluster") is None:
        raise BuildError(f"build needs +cluster=NAME ({', '.join(sorted(BUILD_PROFILES))})")
    return OmegaConf.to_container(cfg.cluster, resolve=True)  # type: ignore[return-value]


def _build(args: argparse.Namespace) -> int:
    output: Optional[str] = None
    overrides = []
    for item in args.overrides:
        if item.startswith("output="):
            output = item.split("=", 1)[1]
        else:
            overrides.append(item)
    cluster = _compose_cluster(overrides)
    name = str(cluster["name"])
    if name not in BUILD_PROFILES:
        raise BuildError(f"no container recipe for cluster {name!r} (recipes: {', '.join(sorted(BUILD_PROFILES))})")
    profile = BUILD_PROFILES[name]
    output = output or default_output(name, cluster)
    argv = build_command(name, cluster.get("container"), recipe_dir=CONTAINERS_DIR, output=output,
                         build_args=_parse_build_args(args.build_arg))
    command = " ".join(shlex.quote(a) for a in argv)
    account = cluster.get("account") or "<account>"
    if profile.needs_job:
        example = profile.job_example.format(account=account, command=command)
        print(LEONARDO_WARNING.format(example=example, account=account), file=sys.stderr)
    if not args.run:
        for line in profile.notes:
            print(line.replace("{account}", str(account)))
        print(f"mkdir -p {shlex.quote(str(Path(output).parent))}")
        print(command)
        return 0
    if profile.needs_job and not os.environ.get("SLURM_JOB_ID") and not args.here:
        print("launcher: not inside a Slurm job: refusing to build here (run it through srun as above, or add --here)",
              file=sys.stderr)
        return 2
    print("launcher: building; this shell should have run first:", file=sys.stderr)
    for line in profile.notes:
        if not line.startswith("#"):
            print("  " + line.replace("{account}", str(account)), file=sys.stderr)
    print(command, file=sys.stderr)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv).returncode


USAGE = """usage: python -m launcher.container build +cluster=NAME [key=value ...] [output=PATH] [--build-arg NAME=VALUE ...] [--run [--here]]
       python -m launcher.container check [--extra train]"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher.container build",
                                     description="Print (or --run) the image build command of +cluster=NAME.")
    parser.add_argument("overrides", nargs="*", help="+cluster=NAME, config overrides key=value, output=PATH")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a recipe argument: BASE_IMAGE (LUMI), NGC_TAG (Leonardo)")
    parser.add_argument("--run", action="store_true", help="run the build instead of printing it")
    parser.add_argument("--here", action="store_true",
                        help="with --run: build outside a Slurm job where the machine says not to")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "check"):
        print(USAGE, file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if argv[0] == "check":
        check = argparse.ArgumentParser(prog="python -m launcher.container check",
                                        description="Inside an image: installed versions satisfy pyproject.toml.")
        check.add_argument("--extra", default="train", help="optional-dependency group to check besides the base")
        return check_installed(check.parse_args(argv[1:]).extra)
    args = _build_parser().parse_intermixed_args(argv[1:])
    try:
        return _build(args)
    except BuildError as err:
        print(f"launcher: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra/OmegaConf composition errors: one line, no traceback
        from launcher.errors import ConfigError

        known = isinstance(err, ConfigError) or type(err).__module__.split(".")[0] in ("hydra", "omegaconf")
        if not known:
            raise
        print(f"launcher: {err}", file=sys.stderr)
        return 2

