"""The preparation itself: the run's tokenizer, then every source's tokenized cache, in this one process with
``data.num_workers`` tokenizing processes. Runs on the login machine (``python -m launcher.prepare`` without
+cluster) or as the CPU job's payload: ``python -m launcher.prepare.work <dir holding config.yaml>``.

Imports of the training stack (transformers, tokenizers, numpy) stay inside functions: the login-side modules of
``launcher.prepare`` import this one only to call it locally.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from launcher.config.schema import LauncherConfig
from launcher.rundir import EXIT_BAD_INPUT, EXIT_OK, TOKENIZER_DIR


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prepare(cfg: LauncherConfig, run_dir: Path, emit: Callable[[str], None] = _say) -> dict[str, Any]:
    """Tokenizer (trained into ``<run_dir>/tokenizer`` when the run trains its own) and caches; returns the report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are processes: no thread pools forked
    from launcher.train.data import cache_root_for, default_workers, prepare_datasets
    from launcher.train.data_cache import run_tokenizer_identity, sources_of
    from launcher.train.data_formats import iter_texts
    from launcher.train.tokenizer import load_or_build_tokenizer

    start = time.perf_counter()
    data = cfg.data

    def texts() -> Any:
        return (text for path, _ in sources_of(data) for text in iter_texts(path, data.format))

    tokenizer = load_or_build_tokenizer(cfg.model, texts, run_dir / TOKENIZER_DIR, is_main=True,
                                        barrier=lambda: None)
    values = asdict(data)
    workers = default_workers(values)
    emit(f"prepare: {len(sources_of(data))} source(s), {workers} worker(s), tokenizer of {len(tokenizer)} ids")
    splits = prepare_datasets(values, tokenizer, cfg.train.seq_len, cache_root_for(values, run_dir.parent),
                              seed=cfg.train.seed, is_main=True, barrier=lambda: None,
                              tokenizer_id=run_tokenizer_identity(cfg.model, data), emit=emit)
    stats = splits.meta.get("stats", {})
    report = {"documents": stats.get("documents", stats.get("examples")), "tokens": stats.get("tokens"),
              "train_rows": len(splits.train), "eval_rows": len(splits.eval), "seconds": time.perf_counter() - start,
              "cache": str(splits.cache_dir), "reused": splits.from_cache,
              "sources": [{k: v for k, v in s.items()} for s in splits.sources]}
    emit(f"prepare: done: {report['documents']} documents, {report['tokens']} tokens, {report['train_rows']} train / "
         f"{report['eval_rows']} eval rows of {cfg.train.seq_len}, {report['seconds']:.1f} s, cache {report['cache']}"
         + (" (reused)" if report["reused"] else ""))
    return report


def main(argv: list[str]) -> int:
    """The CPU job's payload: prepare for the config in ``argv[0]`` (a directory holding config.yaml)."""
    from launcher.config.load import read_run_config
    from launcher.plan.job import run_dir_of

    if len(argv) != 1:
        _say("usage: python -m launcher.prepare.work <directory holding config.yaml>")
        return EXIT_BAD_INPUT
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = read_run_config(argv[0])
    try:
        prepare(cfg, run_dir_of(cfg))
    except (ValueError, FileNotFoundError) as error:
        _say(f"prepare: error: {error}")
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
