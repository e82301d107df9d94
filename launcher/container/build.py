"""Building the image (login node, or a Slurm job on Leonardo): the build command of each machine and its CLI.

``python -m launcher.container build +cluster=lumi|leonardo [key=value ...] [output=PATH] [--build-arg NAME=VALUE ...]
[--run [--here]]`` prints the machine's build command with the environment to prepare, or runs it. Hydra and
OmegaConf are imported only when the CLI composes the config.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from launcher.config.schema import ClusterConfig, ContainerConfig
from launcher.container.exec import ENV_NAME
from launcher.container.recipe import read_recipe
from launcher.errors import UserError
from launcher.paths import CONTAINERS_DIR

RUNTIMES = ("singularity", "apptainer")
# A recipe argument lands in the definition file's header and in %post's shell lines: image references, tags, paths.
BUILD_ARG_VALUE = re.compile(r"[A-Za-z0-9._/:@+=,~-]+")
BUILD_ARG_ALLOWED = "letters, digits and . _ / : @ + = , ~ - (an image path, docker://... reference or tag)"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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
    "warning: CINECA does not support building images from definition files on Leonardo (docs/containers.md).\n"
    "Build on another machine with Apptainer >= 1.2 (the command below, with output= a local path) and copy the .sif\n"
    "to $WORK/containers/, or pull the NGC base and install the pins into a sandbox in a lrd_all_serial job with\n"
    "--gres=tmpfs:100G (docs/containers.md, route 2). Never in the login shell (killed after 10 minutes of CPU time).\n"
    "If your project is allowed to build there anyway:\n"
    "  {example}\n"
)


class BuildError(UserError):
    """A build request that cannot work: the field, the value, why, and what to pass instead (one line, exit 2)."""


def build_profile(cluster_name: str) -> BuildProfile:
    """The build profile of a cluster; ``BuildError`` naming the recipes there are when it has none."""
    profile = BUILD_PROFILES.get(cluster_name)
    if profile is None:
        raise BuildError("+cluster", cluster_name, "no container recipe for this cluster",
                         f"one of: {', '.join(sorted(BUILD_PROFILES))}")
    return profile


def shell_fill(template: str, account: str) -> str:
    """``template`` with ``{account}`` as literal text wherever it stands: bare, single-quoted when the shell would
    read it otherwise; inside a double-quoted string as it is, unless it holds one of ``"$`\\!`` (then the string
    is closed around the single-quoted value: ``"/scratch/"'a$b'"/x"``). The templates hold no single quotes and
    no escaped double quotes."""
    parts = template.split("{account}")
    out, in_double = [parts[0]], parts[0].count('"') % 2 == 1
    for part in parts[1:]:
        if not in_double:
            out.append(shlex.quote(account))
        elif any(c in account for c in '"$`\\!'):
            out.append(f'"{shlex.quote(account)}"')
        else:
            out.append(account)
        out.append(part)
        in_double ^= part.count('"') % 2 == 1
    return "".join(out)


def check_path(field: str, value: str, what: str) -> None:
    """A path that goes into a definition file or a command: no white space or control character (definition files
    split on white space), no leading '-' (an option to the runtime)."""
    if not value or any(c.isspace() for c in value) or _CONTROL.search(value) or value.startswith("-"):
        why = ("empty" if not value else "starts with '-' (it would be read as an option)" if value.startswith("-")
               else "contains white space or a control character (definition files split on white space)")
        raise BuildError(field, value, why, what)


def build_command(cluster_name: str, container: Optional[ContainerConfig], *, recipe_dir: Path, output: Any,
                  build_args: Optional[Mapping[str, str]] = None, project_dir: Optional[Path] = None) -> List[str]:
    """``[runtime, "build", flags..., "--build-arg", "PROJECT_DIR=<checkout>", ..., output, recipe]``.

    ``build_args`` override the recipe's ``%arguments`` (``BASE_IMAGE`` on LUMI, ``NGC_TAG`` on Leonardo); a name
    the recipe does not define is refused. ``project_dir`` defaults to the checkout holding ``recipe_dir``.
    """
    profile = build_profile(cluster_name)
    recipe_path = Path(recipe_dir) / profile.recipe
    recipe = read_recipe(recipe_path)
    project = Path(project_dir) if project_dir is not None else Path(recipe_dir).resolve().parent
    if not (project / "pyproject.toml").is_file():
        raise BuildError("PROJECT_DIR", str(project), "not a source checkout (no pyproject.toml)",
                         "build from a clone of the repository")
    check_path("PROJECT_DIR", str(project), "a checkout whose path has no white space")
    check_path("output", str(output), "a path without white space, e.g. output=/project/<account>/containers/x.sif")
    extra = dict(build_args or {})
    unknown = sorted(set(extra) - set(recipe.arguments))
    if unknown:
        raise BuildError("--build-arg", unknown[0], f"{profile.recipe} has no such argument",
                         f"one of: {', '.join(sorted(recipe.arguments))}")
    for key, value in extra.items():
        if not BUILD_ARG_VALUE.fullmatch(value):
            raise BuildError(f"--build-arg {key}", value, "holds characters the recipe would pass to a shell",
                             BUILD_ARG_ALLOWED)
    runtime = container.runtime if container is not None else "singularity"
    if runtime not in RUNTIMES:
        raise BuildError("cluster.container.runtime", runtime, "not a container runtime",
                         f"one of: {', '.join(RUNTIMES)}")
    args = [runtime, "build", *profile.flags, "--build-arg", f"PROJECT_DIR={project}"]
    for key, value in extra.items():
        if key != "PROJECT_DIR":
            args += ["--build-arg", f"{key}={value}"]
    return args + [str(output), str(recipe_path)]


def default_output(cluster_name: str, cluster: ClusterConfig) -> str:
    """Where the image goes without ``output=``: the profile's ``container.image`` unless that is read-only (LUMI's
    ``/appl`` base images), else the machine's project location."""
    profile = build_profile(cluster_name)
    image = cluster.container.image if cluster.container is not None else ""
    # A profile image interpolated from a missing account reads ".../None/...": not a place to build into.
    if image and not image.startswith(profile.read_only_prefixes) and "/None/" not in image:
        return image
    if profile.default_output and cluster.account:
        return profile.default_output.format(account=cluster.account)
    example = (profile.default_output or "/path/to/launcher-{account}.sif").format(account="<account>")
    raise BuildError("cluster.container.image", image or None, "not a place to build into (read-only or unset)",
                     f"pass output={example}" + (" or cluster.account=<account>" if profile.default_output else ""))


# --- the build CLI ------------------------------------------------------------------------------------------------


def _parse_build_args(items: Sequence[str]) -> Dict[str, str]:
    """``NAME=VALUE`` items of ``--build-arg`` as a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not ENV_NAME.match(key):
            raise BuildError("--build-arg", item, "not NAME=VALUE", "e.g. --build-arg BASE_IMAGE=/path/to/base.sif")
        out[key] = value
    return out


def _split_output(items: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """``output=PATH`` (the last one wins) apart from the config overrides."""
    output: Optional[str] = None
    overrides = []
    for item in items:
        if item.startswith("output="):
            output = item.split("=", 1)[1]
        else:
            overrides.append(item)
    return output, overrides


def _compose_cluster(overrides: Sequence[str]) -> ClusterConfig:
    """The resolved, typed ``cluster`` section of the config the overrides compose."""
    from launcher.config import compose, to_typed
    from launcher.config.schema import as_container

    cluster = to_typed(as_container(compose(list(overrides)))).cluster
    if cluster is None:
        raise BuildError("+cluster", None, "build needs a cluster",
                         f"+cluster=NAME, one of: {', '.join(sorted(BUILD_PROFILES))}")
    return cluster


def check_account(cluster: ClusterConfig) -> None:
    """The account, when given, as the launcher checks it (the profile's pattern), and never with control characters:
    it is printed into shell lines (quoted, see ``shell_fill``)."""
    account = cluster.account
    if account is None:
        return
    if _CONTROL.search(account) or not account:
        raise BuildError("cluster.account", account, "empty or holds control characters",
                         f"an account matching {cluster.account_pattern!r}")
    if not re.fullmatch(cluster.account_pattern, account):
        raise BuildError("cluster.account", account, f"does not match the {cluster.name} pattern",
                         f"an account matching {cluster.account_pattern!r}")


def _print_build(profile: BuildProfile, account: str, output: str, command: str) -> None:
    """Print what to run: the machine's notes, the output folder's ``mkdir`` and the build command."""
    for line in profile.notes:
        print(shell_fill(line, account))
    print(f"mkdir -p {shlex.quote(str(Path(output).parent))}")
    print(command)


def _run_build(profile: BuildProfile, account: str, output: str, argv: List[str], *, here: bool) -> int:
    """Run the build here (refused outside a Slurm job where the machine needs one, unless ``here``)."""
    if profile.needs_job and not os.environ.get("SLURM_JOB_ID") and not here:
        print("launcher: not inside a Slurm job: refusing to build here (run it through srun as above, or add --here)",
              file=sys.stderr)
        return 2
    print("launcher: building; this shell should have run first:", file=sys.stderr)
    for line in profile.notes:
        if not line.startswith("#"):
            print("  " + shell_fill(line, account), file=sys.stderr)
    print(" ".join(shlex.quote(a) for a in argv), file=sys.stderr)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv).returncode


def build_cli(items: Sequence[str], *, build_args: Sequence[str] = (), run: bool = False, here: bool = False) -> int:
    """``build``: compose the config of ``items`` (overrides and ``output=PATH``), then print the build or ``run`` it.

    Raises ``BuildError`` for a request that cannot work, and lets config composition errors through.
    """
    output, overrides = _split_output(items)
    cluster = _compose_cluster(overrides)
    check_account(cluster)
    name = cluster.name
    profile = build_profile(name)
    output = output or default_output(name, cluster)
    argv = build_command(name, cluster.container, recipe_dir=CONTAINERS_DIR, output=output,
                         build_args=_parse_build_args(build_args))
    command = " ".join(shlex.quote(a) for a in argv)
    account = cluster.account or "<account>"
    if profile.needs_job:
        example = shell_fill(profile.job_example, account).replace("{command}", command)
        print(LEONARDO_WARNING.format(example=example), file=sys.stderr)
    if not run:
        _print_build(profile, account, output, command)
        return 0
    return _run_build(profile, account, output, argv, here=here)
