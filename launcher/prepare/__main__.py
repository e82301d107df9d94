"""``python -m launcher.prepare [+cluster=NAME] [key=value ...]``: the run's overrides, the run's cache.

The config is composed and validated exactly as ``python -m launcher`` does (``launcher.config.validated``), so the
cache written is the one that run reads. Without +cluster the tokenizer and the cache are built here, with
``data.num_workers`` processes and a progress line; with +cluster a CPU-only job does it on ``cluster.cpu_partition``
(``dry_run=true`` prints its script). Exit 0 done or submitted, 2 bad input (one line), 1 a bug.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from launcher.cli_errors import ArgumentParser, run_cli


def _main(argv: List[str]) -> int:
    parser = ArgumentParser(prog="python -m launcher.prepare",
                            description="Tokenize the run's data into the cache its training reads.")
    parser.add_argument("overrides", nargs="*", help="the run's overrides: +cluster=NAME, data=..., data.path=...")
    args = parser.parse_intermixed_args(argv)
    from launcher.config import validated
    from launcher.plan.job import run_dir_of

    cfg = validated(args.overrides)
    if cfg.cluster is None and cfg.dry_run:
        from launcher.prepare.caches import source_caches

        for cache in source_caches(cfg):
            print(f"launcher: dry run: {cache.path} ({cache.data_bytes / 1e6:,.1f} MB) -> {cache.directory} "
                  + ("(exists)" if cache.meta is not None else "(would be built here)"))
        return 0
    if cfg.cluster is None:
        from launcher.prepare.work import prepare

        report = prepare(cfg, run_dir_of(cfg))
        print(f"launcher: prepared {report['cache']}: {report['documents']} documents, {report['tokens']} tokens, "
              f"{report['seconds']:.1f} s")
        return 0
    return _submit(cfg)


def _submit(cfg) -> int:
    from launcher.prepare import slurm

    missing = slurm.missing_sources(cfg)
    if not missing and not cfg.data.verify:
        print("launcher: already prepared: " + ", ".join(str(s.directory) for s in slurm.source_caches(cfg)))
        return 0
    job = slurm.plan_job(cfg, missing or slurm.source_caches(cfg))
    if cfg.dry_run:
        print(f"launcher: dry run, nothing submitted: prepare job for {job.data_bytes / 1e6:,.1f} MB\n")
        print(slurm.render(cfg, job))
        return 0
    job_id = slurm.pending_job(job) or slurm.submit(cfg, job)
    print(f"launcher: prepare job {job_id} on {job.partition} ({job.cpus} cores, {job.mem_gb}G, {job.time}) -> "
          f"{job.directory}/prepare-{job_id}.out\n  then train with the same overrides: python -m launcher ...; a GPU "
          f"job submitted meanwhile waits for it (--dependency=afterok:{job_id})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
