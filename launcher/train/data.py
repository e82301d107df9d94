"""Tokenized datasets for causal-LM training: tokenize once (rank 0, or ``python -m launcher.prepare``) into a cache,
memory-map it on every rank.

Packed formats (text, jsonl_text): streamed and tokenized in parallel straight into flat token arrays with a
document index (``launcher.train.stream``), read back as contiguous ``seq_len`` rows (``launcher.train.packed``);
labels are the inputs (the model shifts them). Supervised formats (instruction, chat): one example per record, padded
or truncated to ``seq_len``, labels -100 on prompt tokens (unless ``train_on_prompt``) and on padding
(``launcher.train.supervised``, a per-example path for small data).

``data.sources`` (a mixture of packed sources with weights): one cache per source, so a source shared by two mixtures
is tokenized once; the splits are the sources' splits concatenated, and ``launcher.train.sampler.MixtureSampler``
draws from them by weight.

The cache is ``<cache_root>/<key>/`` (the key: ``launcher.train.data_cache``), written to a temp dir and renamed,
``meta.json`` last. Imports of torch and datasets stay inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np

from launcher.train import data_cache as C
from launcher.train.data_cache import cache_root_for, sources_of
from launcher.train.data_formats import (
    INSTRUCTION_PROMPT,
    INSTRUCTION_PROMPT_NO_INPUT,
    PACKED_FORMATS,
    check_seq_len,
    detect_format,
    instruction_prompt,
    iter_texts,
    resolve_data_files,
    validate_data_file,
)
from launcher.train.packed import ConcatSplit, PackedSplit, PaddedRows, rows_batch
from launcher.train.supervised import IGNORE_INDEX, pad_token_id, split_indices

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DatasetSplits", "TokenizedSplit", "cache_root_for", "check_seq_len", "detect_format", "IGNORE_INDEX",
    "instruction_prompt", "iter_texts", "prepare_datasets", "sources_of", "split_indices", "validate_data_file",
]

log = logging.getLogger(__name__)


class TokenizedSplit(PaddedRows):
    """One supervised split, memory-mapped from the cache: rows of ``seq_len`` token ids, right-padded."""

    def __init__(self, directory: Path, *, packed: bool) -> None:
        self.directory = directory
        self.input_ids = _load_array(directory / "input_ids.npy")
        self.lengths = _load_array(directory / "lengths.npy")  # real tokens per row; the rest is padding
        # Packed rows train on every real token, so their labels are derived rather than stored.
        self.labels = None if packed else _load_array(directory / "labels.npy")

    def __getitem__(self, index: int) -> dict[str, "torch.Tensor"]:
        return {name: tensor[0] for name, tensor in self.collate([index]).items()}

    def collate(self, indices: list[int], *, skip_full_mask: bool = False) -> dict[str, "torch.Tensor"]:
        """Stacked LongTensors input_ids, labels, attention_mask of shape (len(indices), seq_len).

        ``skip_full_mask``: no attention_mask when no row has padding (packed rows): transformers then takes its
        causal-only path, without checking the mask on every forward (a host sync on GPUs).
        """
        idx = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else np.asarray(self.labels[idx], dtype=np.int64)
        return rows_batch(np.asarray(self.input_ids[idx], dtype=np.int64), np.asarray(self.lengths[idx]), self.seq_len,
                      skip_full_mask, labels)


@dataclass
class DatasetSplits:
    train: Any  # TokenizedSplit, PackedSplit or ConcatSplit (a mixture)
    eval: Any
    format: str
    cache_dir: Path  # the (first) source's cache
    from_cache: bool  # False when this call tokenized (on rank 0)
    meta: dict[str, Any] = field(default_factory=dict)
    # A mixture: per source its path, weight, train rows and cache directory (empty for one data.path).
    sources: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Source:
    path: str
    weight: float
    files: list[Path]
    directory: Path
    components: dict[str, Any]


def prepare_datasets(
    data_cfg: Mapping[str, Any],
    tokenizer: "PreTrainedTokenizerBase",
    seq_len: int,
    cache_root: Path,
    *,
    seed: int,
    is_main: bool,
    barrier: Callable[[], None],
    tokenizer_id: Optional[Mapping[str, Any]] = None,
    emit: Optional[Callable[[str], None]] = None,
) -> DatasetSplits:
    """Train and eval splits of ``data_cfg``, tokenized once by rank 0 into the cache and memory-mapped by all.

    Every rank calls ``barrier()`` exactly once. ``cache_root`` must be on a file system all nodes share.
    ``tokenizer_id``: the tokenizer's identity as the login node computes it (``data_cache.tokenizer_identity``), so
    that ``python -m launcher.prepare`` and the dry run find the same cache; None hashes the tokenizer object.
    """
    fmt = data_cfg.get("format") or detect_format(sources_of(data_cfg)[0][0])
    ident = dict(tokenizer_id) if tokenizer_id is not None else {"object": tokenizer_fingerprint(tokenizer)}
    sources = [_source(data_cfg, path, weight, fmt, ident, seq_len, seed, Path(cache_root))
               for path, weight in sources_of(data_cfg)]
    if len(sources) > 1 and fmt not in PACKED_FORMATS:
        raise ValueError(f"data.sources: a mixture takes packed data (text, jsonl_text), not data.format={fmt}")
    built = False
    if is_main:
        for source in sources:
            built |= _ensure(source, data_cfg, fmt, tokenizer, seq_len, seed, emit or log.info)
    barrier()  # unconditional, see the docstring
    return _open(sources, fmt, seq_len, tokenizer, from_cache=not built)


def _source(data_cfg: Mapping[str, Any], path: str, weight: float, fmt: str, ident: dict[str, Any], seq_len: int,
            seed: int, cache_root: Path) -> _Source:
    files = resolve_data_files(path)
    templates = [INSTRUCTION_PROMPT, INSTRUCTION_PROMPT_NO_INPUT] if fmt == "instruction" else []
    components = C.cache_components({**data_cfg, "path": path}, files, fmt, ident, seq_len, seed, templates)
    return _Source(path, weight, files, cache_root / C.cache_key(components), components)


def _ensure(source: _Source, data_cfg: Mapping[str, Any], fmt: str, tokenizer: Any, seq_len: int, seed: int,
            emit: Callable[[str], None]) -> bool:
    """Build the source's cache unless a complete one matches; True when it built."""
    meta = C.read_meta(source.directory)
    verify = bool(data_cfg.get("verify", False))
    if meta is not None:
        stale = C.stale_files(meta, source.files) if verify else []
        if not stale:
            emit(f"tokenized cache reused: {source.directory} ({meta['rows']['train']} train / "
                 f"{meta['rows']['eval']} eval rows); matched {C.describe_match(source.components, verified=verify)}")
            return False
        emit(f"tokenized cache {source.directory} is stale: the content of {', '.join(stale)} changed (data.verify)")
    validate_data_file(source.path, fmt)  # file:line errors before datasets' opaque ones
    _build_cache(source, {**data_cfg, "path": source.path}, fmt, tokenizer, seq_len, seed, emit)
    return True


def _open(sources: list[_Source], fmt: str, seq_len: int, tokenizer: Any, *, from_cache: bool) -> DatasetSplits:
    metas = [C.read_meta(s.directory) for s in sources]
    for source, meta in zip(sources, metas):
        if meta is None:
            raise FileNotFoundError(f"{source.directory}: rank 0 wrote no tokenized cache here; is data.cache_dir on "
                                    "a file system all nodes share?")
    if fmt not in PACKED_FORMATS:
        d = sources[0].directory
        return DatasetSplits(train=TokenizedSplit(d / "train", packed=False),
                             eval=TokenizedSplit(d / "eval", packed=False),
                             format=fmt, cache_dir=d, from_cache=from_cache, meta=metas[0])
    pad = pad_token_id(tokenizer)
    splits = {name: [PackedSplit(s.directory / name, seq_len=seq_len, pad_id=pad) for s in sources]
              for name in ("train", "eval")}
    if len(sources) == 1:
        return DatasetSplits(train=splits["train"][0], eval=splits["eval"][0], format=fmt,
                             cache_dir=sources[0].directory, from_cache=from_cache, meta=metas[0])
    described = [{"path": s.path, "weight": s.weight, "rows": len(t), "tokens": t.num_tokens,
                  "cache_dir": str(s.directory)} for s, t in zip(sources, splits["train"])]
    return DatasetSplits(train=ConcatSplit(splits["train"]), eval=ConcatSplit(splits["eval"]), format=fmt,
                         cache_dir=sources[0].directory, from_cache=from_cache, meta=metas[0], sources=described)


def tokenizer_fingerprint(tokenizer: "PreTrainedTokenizerBase") -> str:
    """A hash of the vocabulary, merges, normalizer, special tokens and chat template."""
    from launcher.train.tokenizer import CHAT_TEMPLATE
    from launcher.train.supervised import _chat_template

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": _chat_template(tokenizer) if tokenizer.chat_template else CHAT_TEMPLATE,
    }
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True)).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- building


def default_workers(data_cfg: Mapping[str, Any]) -> int:
    """data.num_workers, else the cores this process may run on (a Slurm job's allocation)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    asked = data_cfg.get("num_workers")
    return max(1, min(int(asked), os.cpu_count() or 1) if asked else cores)


def _build_cache(source: _Source, data_cfg: Mapping[str, Any], fmt: str, tokenizer: "PreTrainedTokenizerBase",
                 seq_len: int, seed: int, emit: Callable[[str], None]) -> None:
    start = time.perf_counter()
    directory = source.directory
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        if fmt in PACKED_FORMATS:
            rows, stats = _build_packed(source, data_cfg, tokenizer, seq_len, seed, tmp, emit)
        else:
            rows, stats = _build_supervised(source, data_cfg, fmt, tokenizer, seq_len, seed, tmp)
        seconds = time.perf_counter() - start
        meta = {"key": source.components, "rows": rows, "stats": stats, "tokenize_seconds": round(seconds, 3),
                "full_sha256": {str(f): C.full_sha256(f) for f in source.files}, "created_unix": time.time()}
        (tmp / C.META_FILE).write_text(json.dumps(meta, indent=1))  # last: its presence marks a complete cache
        _publish(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(f"tokenized {source.path} ({fmt}) in {seconds:.2f} s -> {directory}: {stats}")


def _build_packed(source: _Source, data_cfg: Mapping[str, Any], tokenizer: Any, seq_len: int, seed: int, tmp: Path,
                  emit: Callable[[str], None]) -> tuple[dict[str, int], dict[str, Any]]:
    from launcher.train import stream

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: documents need one to end")
    dtype = stream.token_dtype(len(tokenizer))
    units = stream.plan_units(source.files)
    progress = stream.Progress(sum(f.stat().st_size for f in source.files), emit)
    results = stream.tokenize_units(units, tokenizer, tmp / "_parts", workers=default_workers(data_cfg),
                                    dtype=dtype, progress=progress)
    counts = stream.merge_parts(tmp / "_parts", results, tmp, eval_fraction=float(data_cfg.get("eval_fraction", 0)),
                                seed=seed, dtype=dtype, what=f"data.path={source.path}")
    shutil.rmtree(tmp / "_parts", ignore_errors=True)
    rows = {name: -(-c["tokens"] // seq_len) for name, c in counts.items()}
    stats = {"documents": sum(c["documents"] for c in counts.values()),
             "tokens": sum(c["tokens"] for c in counts.values()), "dtype": dtype.name, "splits": counts,
             "units": len(units)}
    return rows, stats


def _build_supervised(source: _Source, data_cfg: Mapping[str, Any], fmt: str, tokenizer: Any, seq_len: int,
                      seed: int, tmp: Path) -> tuple[dict[str, int], dict[str, Any]]:
    from launcher.train.supervised import tokenize_supervised

    splits, stats = tokenize_supervised(source.files, tmp / "_hf_datasets", data_cfg, fmt, tokenizer, seq_len, seed)
    shutil.rmtree(tmp / "_hf_datasets", ignore_errors=True)  # datasets' Arrow copy of the raw data
    for name, arrays in splits.items():
        (tmp / name).mkdir()
        for array_name, array in arrays.items():
            np.save(tmp / name / f"{array_name}.npy", array)
    return {k: len(v["input_ids"]) for k, v in splits.items()}, stats


def _publish(tmp: Path, directory: Path) -> None:
    """Rename into place; a stale cache (data.verify found new content) is moved aside first."""
    if C.read_meta(directory) is not None:
        old = directory.with_name(f".{directory.name}.stale-{uuid.uuid4().hex[:8]}")
        os.rename(directory, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, directory)
    except OSError:
        if C.read_meta(directory) is None:  # anything else than "another job published the same key first"
            raise


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # older numpy cannot memory-map an empty array (eval split with eval_fraction=0)
        return np.load(path)
