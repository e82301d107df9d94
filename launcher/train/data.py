"""Tokenized datasets for causal-LM training: load, tokenize once on rank 0, cache, memory-map on every rank.

Packed formats (text, jsonl_text): documents joined with eos and cut into contiguous ``seq_len`` blocks; labels are
the inputs (the model shifts them). Supervised formats (instruction, chat): one example per record, padded or
truncated to ``seq_len``, labels -100 on prompt tokens (unless ``train_on_prompt``) and on padding.

The cache is ``<cache_root>/<key>/`` with one ``.npy`` per array, written to a temp dir and renamed. We chose .npy
over ``datasets.save_to_disk``: ``np.load(mmap_mode="r")`` opens in microseconds whatever the size, every rank on a
node shares the same page-cache pages, and a batch is one fancy-index of a 2-D array instead of per-row Arrow-to-
Python conversion (measured in docs/data.md).

Imports of torch and datasets stay inside functions so that importing this module stays cheap.
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
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from launcher.train.data_formats import (
    INSTRUCTION_PROMPT,
    INSTRUCTION_PROMPT_NO_INPUT,
    PACKED_FORMATS,
    check_seq_len,
    detect_format,
    instruction_prompt,
    iter_texts,
    loader_name,
    resolve_data_files,
    validate_data_file,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DatasetSplits", "TokenizedSplit", "cache_key", "cache_root_for", "check_seq_len", "detect_format",
    "iter_texts", "prepare_datasets", "validate_data_file",
]

log = logging.getLogger(__name__)

# Bump when the arrays written for the same inputs would change (templates, packing, layout).
CACHE_VERSION = 1
IGNORE_INDEX = -100
_CHUNK = 1000  # records per tokenizer call: big enough for the Rust batch encoder, small enough for memory

Segment = tuple[str, bool]  # (text, counts in the loss)


class TokenizedSplit:
    """One split, memory-mapped from the cache: rows of ``seq_len`` token ids, right-padded."""

    def __init__(self, directory: Path, *, packed: bool) -> None:
        self.directory = directory
        self.input_ids = _load_array(directory / "input_ids.npy")
        self.lengths = _load_array(directory / "lengths.npy")  # real tokens per row; the rest is padding
        # Packed rows train on every real token, so their labels are derived rather than stored.
        self.labels = None if packed else _load_array(directory / "labels.npy")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the split."""
        return int(self.lengths.sum())

    def __getitem__(self, index: int) -> dict[str, "torch.Tensor"]:
        return {name: tensor[0] for name, tensor in self.collate([index]).items()}

    def collate(self, indices: list[int], *, skip_full_mask: bool = False) -> dict[str, "torch.Tensor"]:
        """Stacked LongTensors input_ids, labels, attention_mask of shape (len(indices), seq_len).

        ``skip_full_mask``: no attention_mask when no row has padding (packed rows): transformers then takes its
        causal-only path, without checking the mask on every forward (a host sync on GPUs).
        """
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        input_ids = np.asarray(self.input_ids[idx], dtype=np.int64)
        lengths = np.asarray(self.lengths[idx])
        full = bool((lengths >= self.seq_len).all())
        mask = None if full else np.arange(self.seq_len)[None, :] < lengths[:, None]
        if self.labels is not None:
            labels = np.asarray(self.labels[idx], dtype=np.int64)
        else:
            labels = input_ids.copy() if mask is None else np.where(mask, input_ids, IGNORE_INDEX)
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if not (skip_full_mask and full):
            ones = np.ones(input_ids.shape, dtype=np.int64)
            batch["attention_mask"] = torch.from_numpy(ones if mask is None else mask.astype(np.int64))
        return batch


@dataclass
class DatasetSplits:
    train: TokenizedSplit
    eval: TokenizedSplit
    format: str
    cache_dir: Path
    from_cache: bool  # False when this call tokenized (on rank 0)
    meta: dict[str, Any] = field(default_factory=dict)


def cache_root_for(data_cfg: Mapping[str, Any], output_dir: str | Path) -> Path:
    """data.cache_dir, else <output_dir>/.cache/tokenized (shared by every run under output_dir)."""
    return Path(data_cfg.get("cache_dir") or Path(output_dir) / ".cache" / "tokenized").expanduser()


def prepare_datasets(
    data_cfg: Mapping[str, Any],
    tokenizer: "PreTrainedTokenizerBase",
    seq_len: int,
    cache_root: Path,
    *,
    seed: int,
    is_main: bool,
    barrier: Callable[[], None],
) -> DatasetSplits:
    """Train and eval splits of ``data_cfg``, tokenized once by rank 0 into the cache and memory-mapped by all.

    Every rank calls ``barrier()`` exactly once. ``cache_root`` must be on a file system all nodes share.
    """
    files = resolve_data_files(data_cfg["path"])
    fmt = data_cfg.get("format") or detect_format(data_cfg["path"])
    components = cache_key_components(data_cfg, files, fmt, tokenizer, seq_len, seed)
    directory = Path(cache_root) / cache_key(components)
    from_cache = True
    if is_main and not _complete(directory):
        validate_data_file(data_cfg["path"], fmt)  # file:line errors before datasets' opaque ones
        _build_cache(directory, data_cfg, files, fmt, tokenizer, seq_len, seed, components)
        from_cache = False
    barrier()  # unconditional, see the docstring
    if not _complete(directory):
        raise FileNotFoundError(f"{directory}: rank 0 wrote no tokenized cache here; is data.cache_dir on a file "
                                "system all nodes share?")
    meta = json.loads((directory / "meta.json").read_text())
    if from_cache and is_main:
        log.info("tokenized cache hit: %s (%d train / %d eval rows)", directory, meta["rows"]["train"],
                 meta["rows"]["eval"])
    packed = fmt in PACKED_FORMATS
    return DatasetSplits(
        train=TokenizedSplit(directory / "train", packed=packed),
        eval=TokenizedSplit(directory / "eval", packed=packed),
        format=fmt, cache_dir=directory, from_cache=from_cache, meta=meta,
    )


# ---------------------------------------------------------------------------------------------- cache key


def cache_key_components(data_cfg: Mapping[str, Any], files: list[Path], fmt: str,
                         tokenizer: "PreTrainedTokenizerBase", seq_len: int, seed: int) -> dict[str, Any]:
    """Everything the cached arrays depend on. Files by path, size and mtime: every rank can compute that
    without reading the data (a content hash would make each rank read the whole corpus)."""
    return {
        "version": CACHE_VERSION,
        "files": [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files],
        "format": fmt,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "train_on_prompt": bool(data_cfg.get("train_on_prompt", False)),
        "eval_fraction": float(data_cfg.get("eval_fraction", 0.0)),
        "seed": seed,
        "templates": [INSTRUCTION_PROMPT, INSTRUCTION_PROMPT_NO_INPUT] if fmt == "instruction" else [],
    }


def cache_key(components: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:20]


def tokenizer_fingerprint(tokenizer: "PreTrainedTokenizerBase") -> str:
    """A hash of the vocabulary, merges, normalizer, special tokens and chat template."""
    from launcher.train.tokenizer import CHAT_TEMPLATE

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": _chat_template(tokenizer) if tokenizer.chat_template else CHAT_TEMPLATE,
    }
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True)).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- building


def _build_cache(directory: Path, data_cfg: Mapping[str, Any], files: list[Path], fmt: str,
                 tokenizer: "PreTrainedTokenizerBase", seq_len: int, seed: int,
                 components: Mapping[str, Any]) -> None:
    start = time.perf_counter()
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        records = _load_records(files, tmp / "_hf_datasets")
        splits, stats = _tokenize_splits(records, data_cfg, fmt, tokenizer, seq_len, seed)
        shutil.rmtree(tmp / "_hf_datasets", ignore_errors=True)  # datasets' Arrow copy of the raw data
        for name, arrays in splits.items():
            (tmp / name).mkdir()
            for array_name, array in arrays.items():
                np.save(tmp / name / f"{array_name}.npy", array)
        seconds = time.perf_counter() - start
        meta = {"key": dict(components), "rows": {k: len(v["input_ids"]) for k, v in splits.items()},
                "stats": stats, "tokenize_seconds": round(seconds, 3), "created_unix": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: its presence marks a complete cache
        _publish(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenized %s (%s) in %.2f s -> %s: %s", data_cfg["path"], fmt, seconds, directory, stats)


def _publish(tmp: Path, directory: Path) -> None:
    try:
        os.rename(tmp, directory)
    except OSError:
        if not _complete(directory):  # anything else than "another job published the same key first"
            raise


def _complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def _load_records(files: list[Path], hf_cache: Path) -> Iterator[dict[str, Any]]:
    """Records in file order through datasets.load_dataset (rank 0 only; offline: local builders)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a tqdm bar per load is noise in a Slurm log
    try:
        ds = datasets.load_dataset(loader_name(files), data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(hf_cache))
    finally:
        if bars:
            datasets.enable_progress_bars()
    for batch in ds.iter(batch_size=_CHUNK):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


def _tokenize_splits(records: Iterator[dict[str, Any]], data_cfg: Mapping[str, Any], fmt: str,
                     tokenizer: "PreTrainedTokenizerBase", seq_len: int, seed: int
                     ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: documents and responses need one to end")
    if fmt in PACKED_FORMATS:
        docs = _tokenize_documents(records, tokenizer)
        train_idx, eval_idx = split_indices(len(docs), float(data_cfg.get("eval_fraction", 0.0)), seed,
                                            what=f"documents in {data_cfg['path']}")
        pad_id = _pad_id(tokenizer)
        splits = {"train": pack([docs[i] for i in train_idx], seq_len, pad_id),
                  "eval": pack([docs[i] for i in eval_idx], seq_len, pad_id)}
        stats = {"documents": len(docs), "tokens": int(sum(len(d) for d in docs))}
        return splits, stats
    examples, dropped = _tokenize_examples(records, fmt, tokenizer, seq_len,
                                           train_on_prompt=bool(data_cfg.get("train_on_prompt", False)))
    train_idx, eval_idx = split_indices(len(examples), float(data_cfg.get("eval_fraction", 0.0)), seed,
                                        what=f"usable examples in {data_cfg['path']} ({dropped} had no response "
                                             f"token within seq_len={seq_len})")
    pad_id = _pad_id(tokenizer)
    splits = {"train": pad_examples([examples[i] for i in train_idx], seq_len, pad_id),
              "eval": pad_examples([examples[i] for i in eval_idx], seq_len, pad_id)}
    lengths = [len(ids) for ids, _ in examples]
    stats = {"examples": len(examples), "dropped_no_response_tokens": dropped,
             "truncated": int(sum(n > seq_len for n in lengths)), "max_tokens": max(lengths)}
    if stats["truncated"] or dropped:
        log.warning("%s: %d of %d examples are longer than train.seq_len=%d (longest %d tokens) and lose their "
                    "ends; %d lost every response token and were dropped", data_cfg["path"], stats["truncated"],
                    len(examples) + dropped, seq_len, stats["max_tokens"], dropped)
    return splits, stats


def split_indices(n: int, eval_fraction: float, seed: int, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices in file order; eval is a seeded random ``eval_fraction`` (at least one if > 0)."""
    n_eval = 0 if eval_fraction <= 0 else max(1, round(eval_fraction * n))
    if n == 0:
        raise ValueError(f"no {what}")
    if n - n_eval < 1:
        raise ValueError(f"{n} {what}: too few to hold out data.eval_fraction={eval_fraction} and still train")
    is_eval = np.zeros(n, dtype=bool)
    is_eval[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def _chunks(records: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode(tokenizer: "PreTrainedTokenizerBase", texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # add_special_tokens=False: bos/eos come from the templates as text, so every tokenizer behaves alike.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _tokenize_documents(records: Iterator[dict[str, Any]], tokenizer: "PreTrainedTokenizerBase") -> list[np.ndarray]:
    """One int32 array per non-empty document, ending with eos."""
    docs: list[np.ndarray] = []
    eos = tokenizer.eos_token_id
    for chunk in _chunks(records):
        texts = [r["text"] for r in chunk if isinstance(r.get("text"), str) and r["text"].strip()]
        docs.extend(np.array([*ids, eos], dtype=np.int32) for ids in _encode(tokenizer, texts))
    return docs


def pack(docs: list[np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Concatenate and cut into ``seq_len`` rows; the tail becomes one right-padded row (nothing is dropped)."""
    flat = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int32)
    rows = -(-len(flat) // seq_len)
    input_ids = np.full(rows * seq_len, pad_id, dtype=np.int32)
    input_ids[: len(flat)] = flat
    lengths = np.full(rows, seq_len, dtype=np.int32)
    if rows and len(flat) % seq_len:
        lengths[-1] = len(flat) % seq_len
    return {"input_ids": input_ids.reshape(rows, seq_len), "lengths": lengths}


def _tokenize_examples(records: Iterator[dict[str, Any]], fmt: str, tokenizer: "PreTrainedTokenizerBase",
                       seq_len: int, *, train_on_prompt: bool) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(input_ids, labels) per record, untruncated; records with no response token inside seq_len are dropped."""
    to_segments = _instruction_segments if fmt == "instruction" else _chat_segments
    examples, dropped = [], 0
    for chunk in _chunks(records):
        per_record = [to_segments(r, tokenizer) for r in chunk]
        # One batched call for every segment of the chunk, then regrouped per record.
        encoded = iter(_encode(tokenizer, [text for segs in per_record for text, _ in segs]))
        for segments in per_record:
            ids: list[int] = []
            labels: list[int] = []
            for (_, trainable), seg_ids in zip(segments, encoded):
                ids.extend(seg_ids)
                labels.extend(seg_ids if trainable or train_on_prompt else [IGNORE_INDEX] * len(seg_ids))
            if all(label == IGNORE_INDEX for label in labels[:seq_len]):
                dropped += 1  # an all -100 row adds nothing but a NaN risk to the loss
                continue
            examples.append((ids, labels))
    return examples, dropped


def _instruction_segments(record: Mapping[str, Any], tokenizer: "PreTrainedTokenizerBase") -> list[Segment]:
    prompt = (tokenizer.bos_token or "") + instruction_prompt(record)
    return [(prompt, False), (record["output"] + tokenizer.eos_token, True)]


def _chat_template(tokenizer: "PreTrainedTokenizerBase") -> str:
    """The tokenizer's template; a dict of named templates resolves to its "default"."""
    template = tokenizer.chat_template
    return template.get("default", next(iter(template.values()))) if isinstance(template, dict) else template


def _chat_segments(record: Mapping[str, Any], tokenizer: "PreTrainedTokenizerBase") -> list[Segment]:
    """Render growing prefixes of the conversation; the text each assistant turn adds is the trainable part.

    Works for any template where rendering n messages is a prefix of rendering n+1 (true of role-tagged templates).
    A tokenizer without a template uses launcher.train.tokenizer.CHAT_TEMPLATE.
    """
    from launcher.train.tokenizer import CHAT_TEMPLATE

    template = _chat_template(tokenizer) if tokenizer.chat_template else CHAT_TEMPLATE
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(i, True)
            segments.append((_after(prompt, done, record), False))
            done = prompt
        text = render(i + 1, False)
        segments.append((_after(text, done, record), message["role"] == "assistant"))
        done = text
    return [(text, trainable) for text, trainable in segments if text]


def _after(text: str, prefix: str, record: Mapping[str, Any]) -> str:
    if not text.startswith(prefix):
        raise ValueError(
            "the tokenizer's chat template does not render a conversation as a prefix of its continuation, so "
            f"prompt turns cannot be masked (record {str(record)[:120]}...); set data.train_on_prompt=true or "
            "use a tokenizer without a template"
        )
    return text[len(prefix):]


def pad_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-truncate/pad to seq_len; padding is pad_id in inputs and -100 in labels."""
    n = len(examples)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int32)
    for row, (ids, labs) in enumerate(examples):
        k = min(len(ids), seq_len)
        input_ids[row, :k] = ids[:k]
        labels[row, :k] = labs[:k]
        lengths[row] = k
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


def _pad_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    # Padding is masked out of attention and loss, so any id works; eos when the tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # older numpy cannot memory-map an empty array (eval split with eval_fraction=0)
        return np.load(path)
