"""Streaming, parallel tokenization of packed data (text, jsonl_text) straight into the cache's on-disk arrays.

The corpus is cut into units: byte ranges of ``UNIT_BYTES`` of a .txt/.jsonl file (a line belongs to the unit its
first byte is in), or a whole .csv/.json file (a quoted CSV field or a JSON array cannot be cut at any newline). The
units depend on the files only, never on the number of workers, and each unit is tokenized on its own into a part
file, so the result is the same, byte for byte, with 1 or 64 workers. A worker reads and tokenizes ``BATCH_BYTES`` of
text at a time: peak memory is the batch and the tokenizer, whatever the corpus size.

Then the parts are merged in order into ``train/`` and ``eval/`` (``tokens.npy``: every document's ids followed by
eos, flat, uint16 when the vocabulary fits, else uint32; ``doc_offsets.npy``: int64, documents + 1 boundaries). The
eval documents are picked by their global index (``eval_mask``), never from a list of documents in memory.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from launcher.train.data_formats import iter_json_records

log = logging.getLogger(__name__)

UNIT_BYTES = 4 << 20  # the unit of work: fixed, so the result cannot depend on the number of workers; small for balance
BATCH_BYTES = 1 << 20  # text per tokenizer call: big enough for the Rust batch encoder, small for memory
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class Unit:
    index: int
    path: str
    start: int
    end: int  # exclusive; -1: the whole file (csv, json)


@dataclass(frozen=True)
class UnitResult:
    index: int
    documents: int
    tokens: int
    bytes: int


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def plan_units(files: list[Path], unit_bytes: Optional[int] = None) -> list[Unit]:
    unit_bytes = unit_bytes or UNIT_BYTES
    units: list[Unit] = []
    for path in files:
        size = path.stat().st_size
        if path.suffix.lower() not in (".txt", ".jsonl") or size <= unit_bytes:
            units.append(Unit(len(units), str(path), 0, -1))
            continue
        for start in range(0, size, unit_bytes):
            units.append(Unit(len(units), str(path), start, min(size, start + unit_bytes)))
    return units


def _lines(unit: Unit) -> Iterator[bytes]:
    """The lines whose first byte lies in [start, end)."""
    with open(unit.path, "rb") as f:
        if unit.start > 0:
            f.seek(unit.start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the rest of a line that began in the previous unit
        end = math.inf if unit.end < 0 else unit.end
        while f.tell() < end:
            line = f.readline()
            if not line:
                return
            yield line


def iter_documents(unit: Unit) -> Iterator[str]:
    """The unit's non-empty documents, in file order (as launcher.train.data_formats reads them)."""
    suffix = Path(unit.path).suffix.lower()
    if suffix == ".csv":
        with open(unit.path, newline="", encoding="utf-8") as f:
            yield from (row["text"] for row in csv.DictReader(f) if (row.get("text") or "").strip())
        return
    if suffix == ".json":
        for _, record in iter_json_records(Path(unit.path)):
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                yield text
        return
    for raw in _lines(unit):
        line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
        if suffix == ".txt":
            text: Any = line
        else:
            text = json.loads(line).get("text") if line.strip() else None
        if isinstance(text, str) and text.strip():
            yield text


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# The worker's tokenizer: set once per process by _init_worker (a pool pickles it once, not per unit).
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eos: int, dtype: str, parts: str) -> None:
    from tokenizers import Tokenizer

    _WORKER.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos, dtype=np.dtype(dtype), parts=Path(parts))


def tokenize_unit(unit: Unit) -> UnitResult:
    """Tokenize one unit into ``parts/<index>.tok`` (ids, eos after each document) and ``<index>.len``."""
    tokenizer, eos, dtype, parts = _WORKER["tokenizer"], _WORKER["eos"], _WORKER["dtype"], _WORKER["parts"]
    documents = tokens = 0
    with open(parts / f"{unit.index}.tok", "wb") as tok, open(parts / f"{unit.index}.len", "wb") as lens:
        for batch in _batches(iter_documents(unit)):
            # add_special_tokens=False: as launcher.train.data, eos is appended here, bos never.
            encoded = tokenizer.encode_batch_fast(batch, add_special_tokens=False) \
                if hasattr(tokenizer, "encode_batch_fast") else tokenizer.encode_batch(batch, add_special_tokens=False)
            ids = [e.ids for e in encoded]
            lengths = np.fromiter((len(i) + 1 for i in ids), dtype=np.int64, count=len(ids))
            # chain: the per-token loop stays in C (a Python generator over tokens costs about 3x more).
            pieces = itertools.chain.from_iterable(piece for doc in ids for piece in (doc, (eos,)))
            flat = np.fromiter(pieces, dtype=dtype, count=int(lengths.sum()))
            tok.write(flat.tobytes())
            lens.write(lengths.tobytes())
            documents += len(ids)
            tokens += int(lengths.sum())
    size = os.path.getsize(unit.path) if unit.end < 0 else unit.end - unit.start
    return UnitResult(unit.index, documents, tokens, size)


def tokenize_units(units: list[Unit], tokenizer: Any, parts: Path, *, workers: int, dtype: np.dtype,
                   progress: Optional[Callable[[UnitResult], None]] = None) -> list[UnitResult]:
    """Every unit into ``parts``, by ``workers`` processes (in this one for a single worker or unit)."""
    parts.mkdir(parents=True, exist_ok=True)
    init = (tokenizer.backend_tokenizer.to_str(), int(tokenizer.eos_token_id), dtype.str, str(parts))
    workers = max(1, min(workers, len(units)))
    results: list[UnitResult] = []
    if workers == 1:
        _init_worker(*init)
        for unit in units:
            results.append(tokenize_unit(unit))
            if progress:
                progress(results[-1])
        return results
    # fork, as datasets.map does: the workers use this module, numpy and the tokenizer's JSON only (never torch), and
    # spawn would re-run the caller's __main__ in every worker.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
        for result in pool.imap(tokenize_unit, units):
            results.append(result)
            if progress:
                progress(result)
    return results


class Progress:
    """One log line every PROGRESS_EVERY_S: bytes done, tokens, tokens/s and the ETA from the bytes left."""

    def __init__(self, total_bytes: int, emit: Callable[[str], None]) -> None:
        self.total, self.emit = max(1, total_bytes), emit
        self.done = self.tokens = 0
        self.start = self.last = time.perf_counter()

    def __call__(self, result: UnitResult) -> None:
        self.done += result.bytes
        self.tokens += result.tokens
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S and self.done < self.total:
            return
        self.last = now
        rate = self.tokens / max(now - self.start, 1e-9)
        eta = (now - self.start) * (self.total - self.done) / max(self.done, 1)
        self.emit(f"prepare: {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB, {self.tokens:,} tokens, "
                  f"{rate:,.0f} tokens/s, ETA {eta:,.0f} s")


# ---------------------------------------------------------------------------------------------- eval split + merge


def eval_count(documents: int, eval_fraction: float) -> int:
    return 0 if eval_fraction <= 0 else max(1, round(eval_fraction * documents))


def eval_mask(first: int, count: int, documents: int, n_eval: int, seed: int) -> np.ndarray:
    """Which of documents [first, first + count) are eval: exactly ``n_eval`` of ``documents``, spread over the whole
    corpus by a seeded affine permutation ``(a * i + b) mod n`` (O(1) state, no list of documents)."""
    if n_eval == 0:
        return np.zeros(count, dtype=bool)
    rng = np.random.default_rng(seed)
    a = 1
    while documents > 1:
        a = int(rng.integers(1, documents))
        if math.gcd(a, documents) == 1:
            break
    b = int(rng.integers(0, documents))
    i = np.arange(first, first + count, dtype=np.uint64)
    return (i * np.uint64(a) + np.uint64(b)) % np.uint64(documents) < np.uint64(n_eval)


def merge_parts(parts: Path, results: list[UnitResult], out: Path, *, eval_fraction: float, seed: int,
                dtype: np.dtype, what: str) -> dict[str, dict[str, int]]:
    """Parts in unit order -> ``out/{train,eval}/{tokens,doc_offsets}.npy``; returns documents and tokens per split."""
    documents = sum(r.documents for r in results)
    n_eval = eval_count(documents, eval_fraction)
    if documents == 0:
        raise ValueError(f"no documents in {what}")
    if documents - n_eval < 1:
        raise ValueError(f"{documents} documents in {what}: too few to hold out data.eval_fraction={eval_fraction} "
                         "and still train")
    counts = {"train": [0, 0], "eval": [0, 0]}  # documents, tokens
    first = 0
    for r in results:  # pass 1: sizes, from the small length files only
        lengths = np.fromfile(parts / f"{r.index}.len", dtype=np.int64)
        mask = eval_mask(first, r.documents, documents, n_eval, seed)
        for name, sel in (("eval", mask), ("train", ~mask)):
            counts[name][0] += int(sel.sum())
            counts[name][1] += int(lengths[sel].sum())
        first += r.documents
    writers = {}
    for name, (docs, tokens) in counts.items():
        (out / name).mkdir(parents=True)
        writers[name] = (_npy_writer(out / name / "tokens.npy", dtype, tokens),
                         _npy_writer(out / name / "doc_offsets.npy", np.dtype(np.int64), docs + 1))
        writers[name][1].write(np.zeros(1, dtype=np.int64).tobytes())
    try:
        _copy_parts(parts, results, writers, documents, n_eval, seed, dtype)
    finally:
        for handles in writers.values():
            for handle in handles:
                handle.close()
    return {name: {"documents": c[0], "tokens": c[1]} for name, c in counts.items()}


def _npy_writer(path: Path, dtype: np.dtype, length: int) -> Any:
    """An open .npy of ``length`` items whose data the caller appends with write(): plain writes, not a memory map,
    so the written pages are the page cache's and never count in this process's resident memory."""
    f = open(path, "wb")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (int(length),)}
    np.lib.format.write_array_header_1_0(f, header)
    return f


def _copy_parts(parts: Path, results: list[UnitResult], writers: dict[str, Any], documents: int, n_eval: int,
                seed: int, dtype: np.dtype) -> None:
    """Pass 2: each part's documents to their split, run by run (consecutive documents of one split at once)."""
    written = {name: 0 for name in writers}  # tokens written per split
    first = 0
    for r in results:
        lengths = np.fromfile(parts / f"{r.index}.len", dtype=np.int64)
        mask = eval_mask(first, r.documents, documents, n_eval, seed)
        ends = np.cumsum(lengths)
        edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1  # where the split changes
        with open(parts / f"{r.index}.tok", "rb") as tokens:
            for lo, hi in zip([0, *edges], [*edges, len(lengths)]):
                if lo == hi:
                    continue
                name = "eval" if mask[lo] else "train"
                start, stop = (int(ends[lo - 1]) if lo else 0), int(ends[hi - 1])
                chunk = tokens.read((stop - start) * dtype.itemsize)  # runs are in order: reads are sequential
                writers[name][0].write(chunk)
                writers[name][1].write((written[name] + ends[lo:hi] - start).astype(np.int64).tobytes())
                written[name] += stop - start
        first += r.documents
        os.remove(parts / f"{r.index}.tok")  # disk: the parts and the result never both hold the whole corpus
