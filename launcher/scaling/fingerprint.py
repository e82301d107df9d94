"""The environment fingerprint of a run: ``<run_dir>/environment.json``, written by rank 0 inside the job.

It answers "what exactly produced these numbers": the code (git commit), the container image (path and digest), the
software stack (python, torch, DeepSpeed, transformers, NCCL or RCCL, CUDA or HIP), and where it ran (job id, node
list, world size, host, date). The scaling report prints a summary and says when the points of a sweep differ.

Nothing here may break training: every field is collected in its own try/except (a failure records None, plus an
``errors`` entry), and torch/deepspeed/transformers are imported inside ``collect_fingerprint`` only (the module is
imported on the login node by the report).

Container digest: ``sha256`` of the first ``DIGEST_HEAD_BYTES`` (64 MiB) of the image file plus its size in bytes,
written ``sha256-head64MiB:<hex>:<size>`` (``digest_method`` says so). Cheap on Lustre, and it changes when the image
is rebuilt (a SIF's header and first partitions differ), but it is not the digest of the whole file; ``apptainer
inspect`` is not used (no apptainer inside the container). When the job script exports ``LAUNCHER_CONTAINER_DIGEST``
(computed outside the container, e.g. ``sha256sum`` of the whole file), that value is used instead, method ``env``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from launcher.paths import PACKAGE_DIR
from launcher.rundir import FINGERPRINT_FILE
from launcher.secrets import is_secret_name
from launcher.versions import package_version

DIGEST_HEAD_BYTES = 64 * 1024 * 1024
CONTAINER_ENV_VARS = ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER")
# Environment variables worth keeping for a communication benchmark (no secrets live under these prefixes).
ENV_PREFIXES = ("NCCL_", "RCCL_", "FI_", "CXI_", "MIOPEN_", "HSA_", "GPU_MAX_HW_QUEUES", "CUDA_DEVICE_MAX_CONNECTIONS",
                "OMP_NUM_THREADS", "TORCH_NCCL_")


def _try(errors: Dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # anything: the fingerprint must never stop a job
        errors[name] = f"{type(exc).__name__}: {exc}"[:300]
        return None


def _git(repo_dir: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()


def git_info(repo_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Commit and dirty flag of the checkout holding the ``launcher`` package (None outside a git checkout)."""
    repo_dir = Path(repo_dir) if repo_dir is not None else PACKAGE_DIR.parent
    if not (repo_dir / ".git").exists():
        return {"git_commit": None, "git_dirty": None, "code_dir": str(repo_dir)}
    commit = _git(repo_dir, "rev-parse", "HEAD")
    dirty = bool(_git(repo_dir, "status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": dirty, "code_dir": str(repo_dir)}


def container_digest(path: str, head_bytes: int = DIGEST_HEAD_BYTES) -> str:
    """``sha256-head<N>MiB:<hex of the first N MiB>:<size in bytes>`` of an image file."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    remaining = head_bytes
    with open(path, "rb") as handle:
        while remaining > 0:
            chunk = handle.read(min(4 * 1024 * 1024, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return f"sha256-head{head_bytes // (1024 * 1024)}MiB:{digest.hexdigest()}:{size}"


def container_info() -> Dict[str, Any]:
    image = next((os.environ[v] for v in CONTAINER_ENV_VARS if os.environ.get(v)), None)
    info: Dict[str, Any] = {"container_image": image, "container_digest": None, "digest_method": None}
    if os.environ.get("LAUNCHER_CONTAINER_DIGEST"):
        info.update(container_digest=os.environ["LAUNCHER_CONTAINER_DIGEST"], digest_method="env")
    elif image and os.path.isfile(image):
        info.update(container_digest=container_digest(image), digest_method="sha256-head64MiB+size")
    elif image:
        info["digest_method"] = "unavailable: image path not visible inside the container (bind its directory)"
    return info


def torch_info() -> Dict[str, Any]:
    """torch version, CUDA or HIP, NCCL/RCCL version and the devices; imported here only (inside the job)."""
    import torch

    info: Dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": getattr(torch.version, "cuda", None),
        "hip": getattr(torch.version, "hip", None),
        "nccl": None,
        "gpu_name": None,
        "gpu_count": 0,
    }
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_name"] = torch.cuda.get_device_name(0)
        version = torch.cuda.nccl.version()  # RCCL's version under ROCm
        info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return info


def slurm_info() -> Dict[str, Any]:
    env = os.environ
    world = env.get("WORLD_SIZE") or env.get("SLURM_NTASKS")
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "nodelist": env.get("SLURM_JOB_NODELIST"),
        "nnodes": int(env["SLURM_NNODES"]) if env.get("SLURM_NNODES", "").isdigit() else None,
        "world_size": int(world) if world and world.isdigit() else None,
        "partition": env.get("SLURM_JOB_PARTITION"),
    }


def selected_env() -> Dict[str, str]:
    return {
        k: v for k, v in sorted(os.environ.items())
        if k.startswith(ENV_PREFIXES) and not is_secret_name(k)
    }


def collect_fingerprint(world_size: Optional[int] = None) -> Dict[str, Any]:
    """The fingerprint as a JSON-ready dict (see the module docstring). ``world_size`` overrides the environment's."""
    errors: Dict[str, str] = {}
    fp: Dict[str, Any] = {
        "schema": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": _try(errors, "hostname", socket.gethostname),
        "python": sys.version.split()[0],
        "platform": _try(errors, "platform", platform.platform),
    }
    fp.update(_try(errors, "git", git_info) or {"git_commit": None, "git_dirty": None})
    fp.update(_try(errors, "container", container_info) or {"container_image": None, "container_digest": None})
    fp.update(_try(errors, "torch", torch_info) or {"torch": None, "nccl": None, "hip": None, "cuda": None})
    for module in ("deepspeed", "transformers", "peft", "accelerate"):
        fp[module] = _try(errors, module, lambda m=module: package_version(m))
    fp.update(_try(errors, "slurm", slurm_info) or {})
    if world_size is not None:
        fp["world_size"] = int(world_size)
    fp["env"] = _try(errors, "env", selected_env) or {}
    fp["errors"] = errors
    return fp


def write_fingerprint(run_dir: Path | str, world_size: Optional[int] = None) -> Optional[Path]:
    """Write ``<run_dir>/environment.json`` atomically (temp file + rename); call on rank 0 only.

    Returns the path, or None when it could not be written (never raises: a benchmark without a fingerprint is still
    a benchmark; the report says the fingerprint is missing).
    """
    try:
        path = Path(run_dir) / FINGERPRINT_FILE
        tmp = path.with_name(f"{FINGERPRINT_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(collect_fingerprint(world_size), indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
        return path
    except Exception as exc:
        print(f"fingerprint: could not write {FINGERPRINT_FILE} in {run_dir}: {exc}", file=sys.stderr, flush=True)
        return None


def read_fingerprint(run_dir: Path | str) -> Optional[Dict[str, Any]]:
    """environment.json of a run; None when absent or unreadable (``launcher.scaling.records.read_fingerprint``)."""
    from launcher.scaling.records import read_fingerprint as read_checked

    return read_checked(Path(run_dir))[0]
