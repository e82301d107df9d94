"""Container recipes, the container command of a job, and the image build command (launcher/container/).

Regenerate the golden files after an intended change:  UPDATE_GOLDEN=1 python -m pytest tests/test_containers.py
then review the diff of tests/golden/containers_*.txt before committing it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

from launcher.config.schema import ClusterConfig, ContainerConfig
from packaging.requirements import Requirement

from launcher.container import batch_setup_lines, command_prefix
from launcher.container.build import BuildError, build_command
from launcher.container.check import check_installed
from launcher.container.exec import exec_command, forwarded_env_names, setup_lines
from launcher.container.recipe import normalize, read_recipe
from login_helpers import assert_matches_golden, LEONARDO_ACCOUNT, LUMI_ACCOUNT, REPO, config

RECIPES = REPO / "containers"
GOLDEN = Path(__file__).parent / "golden"
LUMI_BASE = "/appl/local/containers/sif-images/lumi-pytorch-rocm-6.2.4-python-3.12-pytorch-v2.7.1.sif"
FROM_BASE_IMAGE = {"torch", "numpy"}  # never reinstalled: the ROCm/CUDA builds come with the base images
TEMPLATE_VARIABLE = re.compile(r"{{\s*(\w+)\s*}}")  # a recipe's {{ NAME }}


def pyproject_requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["train"]
    return {normalize(req.name): req for req in map(Requirement, lines)}


@pytest.fixture(scope="module")
def recipes():
    return {name: read_recipe(RECIPES / f"{name}.def") for name in ("lumi", "leonardo")}


# --- recipes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, bootstrap, source", [
    ("lumi", "localimage", "{{ BASE_IMAGE }}"),
    ("leonardo", "docker", "nvcr.io/nvidia/pytorch:{{ NGC_TAG }}"),
])
def test_recipe_header_and_sections(recipes, name, bootstrap, source):
    recipe = recipes[name]
    assert recipe.text.startswith("Bootstrap:"), "Bootstrap must be the first header line"
    assert recipe.header == {"bootstrap": bootstrap, "from": source}
    for section in ("arguments", "files", "post", "environment", "labels", "help", "test"):
        assert recipe.sections.get(section, "").strip(), f"{name}.def has no %{section}"
    assert set(recipe.sections) <= {"arguments", "files", "post", "environment", "labels", "help", "test"}
    # SingularityCE fails on a {{ VAR }} without a value: every one needs a default.
    variables = set(TEMPLATE_VARIABLE.findall(recipe.text))
    assert variables <= set(recipe.arguments), variables


def test_lumi_base_image_is_the_lumi_pytorch_image_of_the_cluster_profile(recipes):
    assert recipes["lumi"].arguments["BASE_IMAGE"] == LUMI_BASE
    # The profile runs the image built from this recipe (the bare base image lacks submitit, peft and the project).
    image = config(["+cluster=lumi", "cluster.account=project_465000123"]).cluster.container.image
    assert image == "/project/project_465000123/containers/launcher-lumi.sif"
    # sif-images entries are symlinks that change: the recipe says so and says to copy the image.
    arguments = recipes["lumi"].sections["arguments"]
    assert "symlinks" in arguments and "cp -L" in arguments


def test_leonardo_base_image_tag_ships_a_torch_within_pyproject_range(recipes):
    tag = recipes["leonardo"].arguments["NGC_TAG"]
    match = re.fullmatch(r"(\d\d)\.(\d\d)-py3", tag)
    assert match, tag
    # 25.01 ships torch 2.6.0a0, a pre-release below torch>=2.6; 25.02 onwards ship 2.7.0a0 or later.
    assert (int(match.group(1)), int(match.group(2))) >= (25, 2)


def test_pins_satisfy_pyproject_ranges(recipes):
    requirements = pyproject_requirements()
    for name, recipe in recipes.items():
        for package, version in recipe.pins.items():
            req = requirements.get(package)
            if req is not None:
                assert req.specifier.contains(version, prereleases=True), f"{name}.def: {package}=={version} vs {req}"


def test_every_requirement_is_pinned_or_comes_from_the_base_image(recipes):
    requirements = set(pyproject_requirements())
    for name, recipe in recipes.items():
        pins = set(recipe.pins)
        assert not pins & FROM_BASE_IMAGE, f"{name}.def reinstalls {pins & FROM_BASE_IMAGE}"
        assert requirements - FROM_BASE_IMAGE <= pins, f"{name}.def misses {requirements - FROM_BASE_IMAGE - pins}"


def test_both_recipes_pin_the_same_versions(recipes):
    assert recipes["lumi"].pins == recipes["leonardo"].pins
    assert recipes["lumi"].pins["deepspeed"] == "0.19.8" and recipes["lumi"].pins["transformers"] == "5.24.0"


@pytest.mark.parametrize("name", ["lumi", "leonardo"])
def test_post_keeps_torch_and_builds_deepspeed_without_ops(recipes, name):
    post = recipes[name].sections["post"]
    assert "--constraint /tmp/launcher-base-constraints.txt" in post  # torch pinned to the installed build
    assert '"torch", "numpy"' in post
    assert "DS_BUILD_OPS=0 python -m pip install --no-build-isolation" in post
    assert "unset PIP_CONSTRAINT" in post
    assert "python -m pip install --no-deps" in post and "/opt/launcher-src" in post
    assert recipes[name].sections["post"].lstrip().startswith("set -eo pipefail")


def test_files_copy_what_the_package_build_needs(recipes):
    force_include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "force-include"]
    for name, recipe in recipes.items():
        lines = [line.strip() for line in recipe.sections["files"].splitlines()]
        sources = [line.split()[0] for line in lines if line and not line.startswith("#")]
        assert all(line.startswith("{{ PROJECT_DIR }}/") for line in lines if line and not line.startswith("#"))
        relative = {line.replace("{{ PROJECT_DIR }}/", "").split()[0] for line in lines
                    if line and not line.startswith("#")}
        assert len(sources) == len(relative)
        assert {"pyproject.toml", "launcher", *force_include} <= relative, name
        assert all((REPO / path).exists() for path in relative), name
        assert "runs" not in relative and "." not in relative  # never the whole checkout


def test_lumi_recipe_handles_conda_images_and_keeps_the_base_environment(recipes):
    post = recipes["lumi"].sections["post"]
    assert 'if ! python -c "import torch" 2>/dev/null && [ -n "${WITH_CONDA:-}" ]; then' in post
    assert 'eval "$WITH_CONDA"' in post
    # Our %environment replaces the base image's 90-environment.sh: the base's copy must survive.
    assert "cp /.singularity.d/env/90-environment.sh /.singularity.d/env/89-lumi-base-environment.sh" in post
    assert "ROCm" in post


@pytest.mark.parametrize("name", ["lumi", "leonardo"])
def test_environment_defaults_to_offline_but_the_job_wins(recipes, name):
    environment = recipes[name].sections["environment"]
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("WANDB_MODE", "offline")):
        assert f'export {var}="${{{var}:-{value}}}"' in environment


@pytest.mark.parametrize("name", ["lumi", "leonardo"])
def test_test_section_imports_the_stack_and_checks_versions(recipes, name):
    test = recipes[name].sections["test"]
    assert "import torch, deepspeed, transformers, peft, accelerate, datasets, launcher" in test
    assert "__version__" in test and "python -m launcher.container check" in test


# --- the job's container command --------------------------------------------------------------------------------

GOLDEN_CASES = {
    "containers_lumi.txt": (["+cluster=lumi", LUMI_ACCOUNT,
                             "cluster.container.image=/project/project_465000123/containers/launcher-lumi.sif"],
                            "/scratch/project_465000123/runs/llama-8b-zero3-none"),
    "containers_leonardo.txt": (["+cluster=leonardo", LEONARDO_ACCOUNT,
                                 "cluster.container.image=/leonardo_work/EUHPC_D35_189/containers/launcher-leonardo.sif"],
                                "/leonardo_work/EUHPC_D35_189/runs/tiny-zero2-none"),
}


def rendered(overrides, run_dir):
    cluster = config(overrides).cluster
    command = command_prefix(cluster, code_dir=Path("/opt/launcher-src"), paths=[Path(run_dir)])
    return ("# srun payload: this, then -u -m submitit.core._submit <folder>\n" + command + "\n\n"
            + "# batch-script setup, after every other export\n" + "\n".join(batch_setup_lines(cluster)) + "\n")


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_container_command(name):
    text = rendered(*GOLDEN_CASES[name])
    assert_matches_golden(GOLDEN / name, text)


def test_lumi_command_binds_the_machine_and_the_checkout():
    cluster = config(["+cluster=lumi", LUMI_ACCOUNT]).cluster
    argv = exec_command(cluster.container, code_dir=Path("/users/me/launcher"),
                        paths=[Path("/scratch/project_465000123/runs/a")])
    assert argv[:2] == ["singularity", "exec"] and "--nv" not in argv
    binds = argv[argv.index("--bind") + 1].split(",")
    assert binds[:3] == ["/var/spool/slurmd", "/opt/cray", "/usr/lib64/libcxi.so.1"]
    assert binds[-1] == "/users/me/launcher"  # the checkout: not under a machine bind
    assert "/scratch/project_465000123/runs/a" not in binds  # covered by /scratch
    assert argv[argv.index("--env") + 1] == "PYTHONPATH=/users/me/launcher"
    assert argv[-2:] == ["/project/project_465000123/containers/launcher-lumi.sif", "python"]


def test_leonardo_command_uses_nv_and_binds_uncovered_paths_once():
    container = config(["+cluster=leonardo", LEONARDO_ACCOUNT]).cluster.container
    argv = exec_command(container, code_dir=None, paths=["/leonardo_work/x/runs/a", "/tmp/data/", "/tmp/data"])
    assert argv[2] == "--nv"
    assert argv[argv.index("--bind") + 1] == "/leonardo_scratch,/leonardo,/leonardo_work,/tmp/data"
    assert "--env" not in argv  # an installed package needs no PYTHONPATH


def test_container_python_may_carry_arguments():
    container = ContainerConfig(runtime="apptainer", image="/i.sif", binds=[], python="python3 -X faulthandler")
    assert exec_command(container, code_dir=None)[-4:] == ["/i.sif", "python3", "-X", "faulthandler"]


@pytest.mark.parametrize("path", ["/data,x", "/data:/elsewhere", "relative/dir", "/a\nb"])
def test_paths_that_cannot_be_bound_are_refused(path):
    container = ContainerConfig(runtime="singularity", image="/i.sif", binds=["/scratch"], python="python")
    with pytest.raises(ValueError):
        exec_command(container, code_dir=Path(path))


def test_a_bind_with_another_destination_does_not_cover_its_source():
    container = ContainerConfig(runtime="singularity", image="/i.sif", binds=["/pfs/lustre1:/data"], python="python")
    argv = exec_command(container, code_dir=None, paths=["/pfs/lustre1/runs"])
    assert argv[argv.index("--bind") + 1] == "/pfs/lustre1:/data,/pfs/lustre1/runs"


def test_setup_lines_forward_names_never_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    cluster = config(["+cluster=lumi", LUMI_ACCOUNT]).cluster
    names = forwarded_env_names(cluster)
    assert names[:2] == ["MASTER_ADDR", "MASTER_PORT"] and "HF_TOKEN" in names and "WANDB_API_KEY" in names
    assert "NCCL_SOCKET_IFNAME" in names and "FI_CXI_DEFAULT_CQ_SIZE" in names  # cluster.env keys
    text = "\n".join(batch_setup_lines(cluster))
    assert "hf_secret_value" not in text and "hsn0" not in text
    assert 'export "SINGULARITYENV_${launcher_var}=${!launcher_var}"' in text
    assert batch_setup_lines(config(["+cluster=local_slurm"]).cluster) == []
    with pytest.raises(ValueError):
        setup_lines(cluster.container, ["OK", "BAD;rm -rf /"])


def test_apptainer_runtime_uses_apptainer_variables():
    lines = "\n".join(setup_lines(ContainerConfig(runtime="/usr/bin/apptainer", image="/i.sif"), ["MASTER_ADDR"]))
    assert "APPTAINERENV_" in lines and 'APPTAINER_BIND="${APPTAINER_BIND:+$APPTAINER_BIND,}$HF_HOME"' in lines
    assert "SINGULARITY" not in lines


def test_without_a_container_the_profile_python_is_used():
    plain = ClusterConfig(name="x", partition="p", python="/opt/venv/bin/python")
    assert command_prefix(plain, code_dir=None) == "/opt/venv/bin/python"
    assert command_prefix(ClusterConfig(name="x", partition="p"), code_dir=None) == shlex.quote(sys.executable)


# --- a stand-in apptainer: the wrapper passes binds and environment through ------------------------------------

STAND_IN = r'''#!{python}
"""Stand-in for `apptainer exec` / `singularity exec`: checks what it is handed, then runs the command here."""
import json, os, sys
from pathlib import Path

name = Path(sys.argv[0]).name
prefix = "APPTAINER" if name.startswith("apptainer") else "SINGULARITY"
args = sys.argv[1:]
assert args[0] == "exec", args
i, flags, binds, env_options = 1, [], [], {{}}
while args[i].startswith("-"):
    if args[i] in ("--bind", "-B"):
        binds += args[i + 1].split(","); i += 2
    elif args[i] == "--env":
        key, value = args[i + 1].split("=", 1); env_options[key] = value; i += 2
    else:
        flags.append(args[i]); i += 1
image, command = args[i], args[i + 1:]
binds += [b for b in os.environ.get(prefix + "_BIND", "").split(",") if b]
# What the real runtime refuses:
missing = [b for b in binds if not os.path.exists(b.split(":")[0])]
if missing:
    sys.exit(f"{{name}}: mount source does not exist: {{missing}}")
if not os.path.isfile(image):
    sys.exit(f"{{name}}: image {{image}} not found")
# The container's environment: the host's, then the image's own (which wins over the host), then
# <PREFIX>ENV_* variables, then --env.
env = {{k: v for k, v in os.environ.items() if not k.startswith(prefix + "ENV_")}}
env.update(json.loads(os.environ.get("STANDIN_IMAGE_ENV", "{{}}")))
env.update({{k[len(prefix) + 4:]: v for k, v in os.environ.items() if k.startswith(prefix + "ENV_")}})
env.update(env_options)
forwarded = sorted(k[len(prefix) + 4:] for k in os.environ if k.startswith(prefix + "ENV_"))
record = {{"flags": flags, "binds": binds, "image": image, "forwarded": forwarded}}
Path(os.environ["STANDIN_RECORD"]).write_text(json.dumps(record))
os.execvpe(command[0], command, env)
'''

PROBE = """
import json, os, launcher
names = ["PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "HF_TOKEN", "HF_HUB_OFFLINE", "NCCL_SOCKET_IFNAME",
         "SLURM_PROCID", "HF_HOME", "SOME_HOST_VAR", "IMAGE_ONLY"]
print(json.dumps({"env": {n: os.environ.get(n) for n in names}, "launcher": launcher.__file__}))
"""


def run_through_stand_in(tmp_path, runtime, *, hf_home):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / runtime
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    machine = tmp_path / "pfs"
    machine.mkdir()
    image = tmp_path / "launcher.sif"
    image.write_text("not really an image")
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    cluster = ClusterConfig(
        name="stand-in", partition="p", env={"HF_HUB_OFFLINE": "0", "NCCL_SOCKET_IFNAME": "hsn0,hsn1"},
        container=ContainerConfig(runtime=runtime, image=str(image), gpu_flag="--rocm", binds=[str(machine)],
                                  python=sys.executable),
    )
    script = "\n".join([
        "#!/bin/bash",
        # What the setup before ours exports (common_setup.sh, cluster.env, the machine template):
        "export MASTER_ADDR=node-0007",
        "export MASTER_PORT=14242",
        "export HF_HUB_OFFLINE=0",
        "export NCCL_SOCKET_IFNAME=hsn0,hsn1",
        f"export HF_HOME={shlex.quote(str(hf_home))}",
        *batch_setup_lines(cluster),
        command_prefix(cluster, code_dir=REPO, paths=[run_dir]) + " -c " + shlex.quote(PROBE),
    ]) + "\n"
    (tmp_path / "job.sh").write_text(script)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHONPATH", "SINGULARITY", "APPTAINER")) and k != "WANDB_API_KEY"}
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "HF_TOKEN": "hf_secret_value",  # from the user's environment, as sbatch passes it on
        "SLURM_PROCID": "3",  # set per task by srun: reaches the task by plain passthrough
        "SOME_HOST_VAR": "host value",  # not forwarded, and the image sets it too: the image wins
        "STANDIN_IMAGE_ENV": json.dumps({"HF_HUB_OFFLINE": "1", "SOME_HOST_VAR": "image value",
                                         "IMAGE_ONLY": "from the image"}),
        "STANDIN_RECORD": str(tmp_path / "record.json"),
    })
    done = subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "record.json").read_text())
    return script, json.loads(done.stdout.strip().splitlines()[-1]), record, machine, run_dir


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_stand_in_runtime_receives_binds_and_environment(tmp_path, runtime):
    hf_home = tmp_path / "hf-cache"  # not under a configured bind: bound at run time, created first
    script, seen, record, machine, run_dir = run_through_stand_in(tmp_path, runtime, hf_home=hf_home)
    assert "hf_secret_value" not in script
    assert record["flags"] == ["--rocm"] and record["image"].endswith("launcher.sif")
    assert record["binds"] == [str(machine), str(REPO), str(run_dir), str(hf_home)]
    # Only what is set goes in: an unset WANDB_API_KEY stays unset, not empty.
    assert {"MASTER_ADDR", "MASTER_PORT", "HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "NCCL_SOCKET_IFNAME"} <= set(
        record["forwarded"])
    assert "WANDB_API_KEY" not in record["forwarded"] and "SLURM_PROCID" not in record["forwarded"]
    assert hf_home.is_dir()
    env = seen["env"]
    assert env["PYTHONPATH"] == str(REPO) and seen["launcher"] == str(REPO / "launcher" / "__init__.py")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node-0007", "14242")
    assert env["HF_TOKEN"] == "hf_secret_value"  # passed in, never written down
    assert env["HF_HUB_OFFLINE"] == "0"  # the job's value beats the image's default
    assert env["NCCL_SOCKET_IFNAME"] == "hsn0,hsn1" and env["SLURM_PROCID"] == "3"
    assert env["HF_HOME"] == str(hf_home)
    assert env["SOME_HOST_VAR"] == "image value" and env["IMAGE_ONLY"] == "from the image"


def test_stand_in_hf_home_under_a_machine_bind_is_not_bound_again(tmp_path):
    hf_home = tmp_path / "pfs" / "hf"
    _, seen, record, machine, run_dir = run_through_stand_in(tmp_path, "apptainer", hf_home=hf_home)
    assert record["binds"] == [str(machine), str(REPO), str(run_dir)]
    assert seen["env"]["HF_HOME"] == str(hf_home)


# --- building the image -------------------------------------------------------------------------------------------


def test_build_command_lumi():
    container = config(["+cluster=lumi", LUMI_ACCOUNT]).cluster.container
    argv = build_command("lumi", container, recipe_dir=RECIPES, output="/project/project_465000123/c/l.sif",
                         build_args={"BASE_IMAGE": "/project/project_465000123/c/base.sif"})
    assert argv == ["singularity", "build", "--build-arg", f"PROJECT_DIR={REPO}",
                    "--build-arg", "BASE_IMAGE=/project/project_465000123/c/base.sif",
                    "/project/project_465000123/c/l.sif", str(RECIPES / "lumi.def")]


def test_build_command_leonardo():
    container = config(["+cluster=leonardo", LEONARDO_ACCOUNT]).cluster.container
    argv = build_command("leonardo", container, recipe_dir=RECIPES, output="/leonardo_work/X/l.sif")
    assert argv == ["singularity", "build", "--fakeroot", "--build-arg", f"PROJECT_DIR={REPO}",
                    "/leonardo_work/X/l.sif", str(RECIPES / "leonardo.def")]


def test_build_command_refuses_unknown_arguments_and_clusters():
    with pytest.raises(BuildError, match="NGC_TAG"):
        build_command("leonardo", None, recipe_dir=RECIPES, output="/x.sif", build_args={"NGC_TAGG": "25.04-py3"})
    with pytest.raises(BuildError, match="local_slurm"):
        build_command("local_slurm", None, recipe_dir=RECIPES, output="/x.sif")


def run_cli(args, env=None, cwd=REPO):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher.container", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_the_lumi_build():
    done = run_cli(["build", "+cluster=lumi", LUMI_ACCOUNT])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "module load LUMI systools" in lines
    assert lines[-1] == (f"singularity build --build-arg PROJECT_DIR={REPO} "
                         f"/project/project_465000123/containers/launcher-lumi.sif {RECIPES / 'lumi.def'}")
    # Without an account or output= there is nowhere to put it.
    done = run_cli(["build", "+cluster=lumi"])
    assert done.returncode == 2 and "output=" in done.stderr and "Traceback" not in done.stderr


def test_cli_warns_that_leonardo_builds_run_as_a_job(tmp_path):
    done = run_cli(["build", "+cluster=leonardo", LEONARDO_ACCOUNT, f"output={tmp_path}/l.sif"])
    assert done.returncode == 0, done.stderr
    assert "login shell" in done.stderr and "srun -A EUHPC_D35_189 -p lrd_all_serial" in done.stderr
    assert done.stdout.splitlines()[-1].startswith("singularity build --fakeroot ")
    env = {k: "" for k in ("SLURM_JOB_ID",)}
    done = run_cli(["build", "+cluster=leonardo", LEONARDO_ACCOUNT, f"output={tmp_path}/l.sif", "--run"], env=env)
    assert done.returncode == 2 and "not inside a Slurm job" in done.stderr
    assert not (tmp_path / "l.sif").exists()


def test_cli_run_executes_the_build(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "singularity"
    fake.write_text(f"#!{sys.executable}\nimport sys, json\nopen({str(tmp_path / 'argv.json')!r}, 'w')"
                    ".write(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    output = tmp_path / "images" / "l.sif"
    done = run_cli(["build", "+cluster=lumi", f"output={output}", "--build-arg", "BASE_IMAGE=/b.sif", "--run"],
                   env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "argv.json").read_text()) == [
        "build", "--build-arg", f"PROJECT_DIR={REPO}", "--build-arg", "BASE_IMAGE=/b.sif", str(output),
        str(RECIPES / "lumi.def")]
    assert output.parent.is_dir()


# --- inside the image: installed versions -------------------------------------------------------------------------


def test_check_passes_in_this_environment_and_flags_a_bad_version(capsys):
    assert check_installed("train") == 0
    versions = {"torch": "2.6.0a0+ecf3bae40a", "deepspeed": "0.19.8"}

    def fake(name):
        from importlib.metadata import PackageNotFoundError, version

        if name in versions:
            return versions[name]
        if name == "peft":
            raise PackageNotFoundError(name)
        return version(name)

    assert check_installed("train", version=fake) == 1
    out = capsys.readouterr().out
    assert re.search(r"BAD\s+torch\s+2\.6\.0a0", out) and re.search(r"BAD\s+peft\s+missing", out)
    assert re.search(r"ok\s+deepspeed\s+0\.19\.8", out)


def test_module_imports_no_training_stack(tmp_path):
    poison = tmp_path / "poison"
    for name in ("torch", "transformers", "deepspeed", "peft", "accelerate", "datasets", "packaging", "hydra"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('login path imported {name}')\n")
    code = ("import launcher.container as c; from pathlib import Path; "
            "import launcher.container.build, launcher.container.check, launcher.container.recipe; "
            "from launcher.config.schema import ClusterConfig, ContainerConfig; "
            "print(c.command_prefix(ClusterConfig(name='x', partition='p', container=ContainerConfig(image='/i.sif')), "
            "code_dir=Path('/src')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(poison), str(REPO)])})
    assert done.returncode == 0, done.stderr
