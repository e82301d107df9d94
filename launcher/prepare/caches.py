"""Which tokenized caches a run reads, found from the login node: the same keys the job computes
(``launcher.train.data_cache``), without torch or transformers. Used by the dry run (steps per epoch, tokens per
source), by the launcher (must a GPU job wait for a prepare job?) and by ``python -m launcher.prepare``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.config.schema import LauncherConfig
from launcher.plan.job import run_dir_of
from launcher.train import data_cache as C
from launcher.train.data_formats import INSTRUCTION_PROMPT, INSTRUCTION_PROMPT_NO_INPUT, resolve_data_files

JOBS_DIR = "jobs"  # <cache_root>/jobs/<key>/: a prepare job's config, script, log and job id


@dataclass(frozen=True)
class SourceCache:
    path: str
    weight: float
    files: tuple[Path, ...]
    directory: Path
    meta: Optional[dict[str, Any]]  # None: not prepared yet

    @property
    def data_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def cache_root(cfg: LauncherConfig) -> Path:
    """The cache root the job uses: its output_dir is the run directory's parent (launch writes it so)."""
    return C.cache_root_for(cfg.data, run_dir_of(cfg).parent).absolute()


def source_caches(cfg: LauncherConfig) -> list[SourceCache]:
    """One entry per source (``data.path`` alone is one source), with its cache's meta.json when it exists."""
    data, fmt = cfg.data, cfg.data.format
    ident = C.run_tokenizer_identity(cfg.model, data)
    templates = [INSTRUCTION_PROMPT, INSTRUCTION_PROMPT_NO_INPUT] if fmt == "instruction" else []
    plain = {"train_on_prompt": data.train_on_prompt, "eval_fraction": data.eval_fraction}
    root = cache_root(cfg)
    found = []
    for path, weight in C.sources_of(data):
        files = resolve_data_files(path)
        components = C.cache_components(plain, files, fmt, ident, cfg.train.seq_len, cfg.train.seed, templates)
        directory = root / C.cache_key(components)
        found.append(SourceCache(path, weight, tuple(files), directory, C.read_meta(directory)))
    return found


def jobs_dir(cfg: LauncherConfig, source: SourceCache) -> Path:
    return cache_root(cfg) / JOBS_DIR / source.directory.name


def summary_lines(cfg: LauncherConfig, world_size: int) -> list[str]:
    """The dry run's data lines: rows and tokens per source, steps per epoch; or that the cache is not built yet."""
    if cfg.task.name != "causal_lm":
        return []
    try:
        caches = source_caches(cfg)
    except (OSError, ValueError, KeyError):  # a dry run shows the cache when it can, never fails on it
        return []
    lines = []
    for cache in caches:
        if cache.meta is None:
            lines.append(f"not tokenized yet ({cache.data_bytes / 1e6:,.1f} MB): python -m launcher.prepare with the "
                         f"same overrides")
            continue
        rows, stats = cache.meta["rows"], cache.meta["stats"]
        tokens = stats.get("splits", {}).get("train", {}).get("tokens", stats.get("tokens", "?"))
        share = f"weight {cache.weight:g}, " if len(caches) > 1 else ""
        lines.append(f"{share}{rows['train']:,} train / {rows['eval']:,} eval rows, {tokens:,} train tokens "
                     f"({cache.directory.name})" if isinstance(tokens, int) else f"{rows['train']:,} train rows")
    if len(caches) == 1 and caches[0].meta is not None:
        train = cfg.train
        step = train.micro_batch_size * train.grad_accum * world_size
        per_epoch = caches[0].meta["rows"]["train"] // step
        epochs = f"; train.epochs={train.epochs}: max_steps {train.epochs * per_epoch}" if train.epochs else ""
        lines.append(f"{per_epoch:,} steps per epoch (global batch {step} sequences){epochs}")
    return lines
