"""Supervised formats (instruction, chat): one padded example per record, labels -100 on the prompt and padding.

These are small-data formats (fine-tuning sets of thousands to a few million records), so they keep a per-example
path: records are read through ``datasets.load_dataset``, tokenized in chunks and held in memory until written.
Packed pretraining data takes the streaming path of ``launcher.train.stream`` instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from launcher.train.data_formats import instruction_prompt, loader_name
from launcher.train.packed import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_CHUNK = 1000  # records per tokenizer call: big enough for the Rust batch encoder, small enough for memory

Segment = tuple[str, bool]  # (text, counts in the loss)


def tokenize_supervised(files: list[Path], hf_cache: Path, data_cfg: Mapping[str, Any], fmt: str,
                        tokenizer: "PreTrainedTokenizerBase", seq_len: int, seed: int
                        ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """{"train": arrays, "eval": arrays} and statistics for instruction or chat records."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: documents and responses need one to end")
    examples, dropped = _tokenize_examples(_load_records(files, hf_cache), fmt, tokenizer, seq_len,
                                           train_on_prompt=bool(data_cfg.get("train_on_prompt", False)))
    train_idx, eval_idx = split_indices(len(examples), float(data_cfg.get("eval_fraction", 0.0)), seed,
                                        what=f"usable examples in {data_cfg['path']} ({dropped} had no response "
                                             f"token within seq_len={seq_len})")
    pad_id = pad_token_id(tokenizer)
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


def pad_token_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    # Padding is masked out of attention and loss, so any id works; eos when the tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
