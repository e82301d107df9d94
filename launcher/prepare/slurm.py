"""The prepare job: a CPU-only Slurm job (the profile's ``cluster.cpu_partition``) that tokenizes into the cache, and
the dependency a GPU job takes on it. Login-node code: stdlib, omegaconf through the launcher's own modules.

Its files live beside the cache, in ``<cache_root>/jobs/<key>/`` (``config.yaml``, ``prepare.sh``, ``job_id``,
``prepare-<job id>.out``), not in a run directory: runs and sweep points that read the same data share the job.
"""

from __future__ import annotations

import math
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from launcher import container as containers
from launcher.config.schema import LauncherConfig
from launcher.errors import ConfigError
from launcher.plan.job import run_dir_of
from launcher.plan.slurm_time import format_time, parse_time
from launcher.prepare.caches import SourceCache, cache_root, jobs_dir, source_caches
from launcher.rundir import write_config, write_script

# Tokenizing throughput assumed per core for the walltime (measured here: 4-6 MB/s per core with a 1k BPE; slower
# tokenizers and file systems are covered by the factor 2 and the fixed 15 minutes).
MB_PER_S_PER_CORE = 2.0
JOB_ID_FILE = "job_id"


@dataclass(frozen=True)
class PrepareJob:
    partition: str
    cpus: int
    mem_gb: int
    time: str
    data_bytes: int
    directory: Path  # <cache_root>/jobs/<key>


def estimate(cfg: LauncherConfig, data_bytes: int) -> tuple[int, int, int]:
    """(cpus, memory GB, walltime s) for a prepare job over ``data_bytes``. Memory does not grow with the corpus
    (streamed in units); training a BPE does (its word counts), hence the term for a run without model.tokenizer."""
    cluster = cfg.cluster
    cpus = min(cluster.cpu_partition_cpus, cfg.data.num_workers or cluster.cpu_partition_cpus)
    trains_bpe = not (cfg.model.tokenizer or cfg.model.pretrained)
    mem = 2 + 0.5 * cpus + (round(min(16.0, data_bytes / 2**30), 1) if trains_bpe else 0.0)
    mem_gb = int(math.ceil(min(cluster.cpu_partition_mem_gb, mem)))
    seconds = 2 * data_bytes / (MB_PER_S_PER_CORE * 1e6 * cpus) + 15 * 60
    partition = cluster.cpu_partition or cluster.partition
    limits = cluster.partitions.get(partition)
    if limits is not None:
        seconds = min(seconds, parse_time(limits.max_time))
    return cpus, mem_gb, int(seconds)


def plan_job(cfg: LauncherConfig, sources: list[SourceCache]) -> PrepareJob:
    data_bytes = sum(s.data_bytes for s in sources)
    cpus, mem_gb, seconds = estimate(cfg, data_bytes)
    partition = cfg.cluster.cpu_partition or cfg.cluster.partition
    return PrepareJob(partition, cpus, mem_gb, format_time(seconds), data_bytes, jobs_dir(cfg, sources[0]))


def render(cfg: LauncherConfig, job: PrepareJob) -> str:
    """The batch script: sbatch header, cluster.env, the container's setup, then launcher.prepare.work."""
    from launcher.slurm.render import code_dir, input_paths

    cluster = cfg.cluster
    header = [f"--job-name=prepare-{job.directory.name[:8]}", f"--partition={job.partition}", "--nodes=1",
              "--ntasks=1", f"--cpus-per-task={job.cpus}", f"--mem={job.mem_gb}G", f"--time={job.time}",
              f"--output={job.directory}/prepare-%j.out"]
    if cluster.account:
        header.append(f"--account={cluster.account}")
    lines = ["#!/bin/bash", *(f"#SBATCH {shlex.quote(h)}" for h in header), "set -euo pipefail"]
    lines += [f"export {name}={shlex.quote(str(value))}" for name, value in cluster.env.items()]
    lines += containers.batch_setup_lines(cluster)
    python = containers.command_prefix(cluster, code_dir=code_dir(),
                                       paths=[run_dir_of(cfg), cache_root(cfg), *input_paths(cfg)])
    lines.append(f"exec {python} -u -m launcher.prepare.work {shlex.quote(str(job.directory))}")
    return "\n".join(lines) + "\n"


def pending_job(job: PrepareJob) -> Optional[str]:
    """The id of a prepare job for this cache that is queued or running (another run or sweep point's)."""
    from launcher.slurm.query import job_states

    try:
        job_id = (job.directory / JOB_ID_FILE).read_text().strip()
    except OSError:
        return None
    state = job_states([job_id]).get(job_id)
    return job_id if state is not None and not state.final else None


def submit(cfg: LauncherConfig, job: PrepareJob) -> str:
    """Write the job's config and script, sbatch it; returns the job id."""
    from launcher.slurm.submit import check_slurm_available

    check_slurm_available()
    write_config(job.directory, replace(cfg, output_dir=str(run_dir_of(cfg).parent), dry_run=False))
    script = write_script(job.directory, render(cfg, job), name="prepare.sh")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError("cluster.cpu_partition", job.partition, "a partition sbatch accepts for a CPU job",
                          f"sbatch said: {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    (job.directory / JOB_ID_FILE).write_text(job_id + "\n")
    return job_id


def missing_sources(cfg: LauncherConfig) -> list[SourceCache]:
    return [s for s in source_caches(cfg) if s.meta is None]


def dependency_for(cfg: LauncherConfig) -> Optional[str]:
    """For a GPU job about to be submitted: the prepare job it must wait for (submitted now, or one already queued
    for the same cache), when its cache is missing and the data is above ``data.prepare_job_above_mb``; None when
    the job tokenizes itself (small data) or the cache exists."""
    if cfg.task.name != "causal_lm":
        return None
    missing = missing_sources(cfg)
    if not missing:
        return None
    job = plan_job(cfg, missing)
    job_id = pending_job(job)
    if job_id is None:
        if job.data_bytes <= cfg.data.prepare_job_above_mb * 1e6:
            return None  # small: rank 0 tokenizes inside the job, as without a prepare job
        job_id = submit(cfg, job)
        what = f"submitted prepare job {job_id}"
    else:
        what = f"prepare job {job_id} is already queued for it"
    print(f"launcher: the tokenized cache is missing and the data is {job.data_bytes / 1e6:,.0f} MB (above "
          f"data.prepare_job_above_mb={cfg.data.prepare_job_above_mb:g}): {what} on {job.partition} ({job.cpus} "
          f"cores, {job.mem_gb}G, {job.time}); this job starts after it succeeds (--dependency=afterok:{job_id}); "
          f"its log: {job.directory}/prepare-{job_id}.out")
    return job_id


def with_dependency(cfg: LauncherConfig, job_id: str) -> LauncherConfig:
    """The config whose job waits for ``job_id`` (an sbatch option: the batch script shows it)."""
    extra = {**cfg.cluster.sbatch_extra, "dependency": f"afterok:{job_id}"}
    return replace(cfg, cluster=replace(cfg.cluster, sbatch_extra=extra))
