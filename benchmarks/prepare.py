"""Tokenizing at pretraining scale: ``python -m launcher.prepare`` on generated corpora of about 20 MB and 200 MB.

Measured, all in one run, with one local tokenizer (a byte-level BPE trained here on a sample and saved; passed as
``model.tokenizer``):

- peak RSS of the prepare command (VmHWM of /proc/<pid>/status, sampled every 50 ms for the command and each of its
  worker processes): the largest single process, and the sum over the process tree;
- tokens/s of the prepare command with 2 workers (its own building time from the cache's meta.json: reading,
  tokenizing, writing, merging, hashing) against ``datasets.load_dataset("json") + Dataset.map(batched=True,
  num_proc=2)`` with the same tokenizer on the same file (loading included: both start from the JSON Lines file);
- whether the caches built with 1 and 2 workers are byte-identical (the 20 MB corpus; ``--identical-large`` also on
  the 200 MB one).

Targets (issue 16): RSS(200 MB) <= 1.3 x RSS(20 MB); ours >= datasets; identical caches.

    python benchmarks/prepare.py                      # about 4 minutes on 2 cores
    python benchmarks/prepare.py --sizes-mb 5 50 --out /tmp/prepare.json   (default: $TMPDIR/prepare_bench.json)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def generate(path: Path, megabytes: float, seed: int = 0) -> None:
    """JSON Lines of {"text": ...}: sentences of words drawn from the bundled examples' vocabulary (Zipf-like)."""
    import numpy as np

    from launcher.paths import EXAMPLES_DIR
    from launcher.train.data_formats import iter_texts

    words = sorted({w for name in ("aac_chat.jsonl", "corpus.txt") for t in iter_texts(EXAMPLES_DIR / name)
                    for w in t.split()})
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    target = int(megabytes * 1e6)
    with path.open("w") as f:
        written = 0
        while written < target:
            ids = rng.choice(len(words), size=(2000, 60), p=p)
            lengths = rng.integers(5, 60, size=2000)
            block = "".join(json.dumps({"text": " ".join(words[i] for i in row[:n])}) + "\n"
                            for row, n in zip(ids, lengths))
            f.write(block)
            written += len(block)


def train_tokenizer(sample: Path, out: Path) -> None:
    from launcher.train.data_formats import iter_texts
    from launcher.train.tokenizer import save_atomically, train_bpe_tokenizer

    texts = [t for _, t in zip(range(50_000), iter_texts(sample))]
    save_atomically(train_bpe_tokenizer(texts, 4096, max_length=2048), out)


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> List[int]:
    """Every descendant of ``pid`` (by the parent pid in /proc/*/stat: works where task/*/children does not)."""
    parents: Dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [child for child, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def run_prepare(corpus: Path, tokenizer: Path, cache: Path, workers: int) -> Dict[str, Any]:
    args = [sys.executable, "-m", "launcher.prepare", f"data.path={corpus}", f"model.tokenizer={tokenizer}",
            f"data.num_workers={workers}", f"data.cache_dir={cache}", f"output_dir={cache.parent / 'runs'}",
            "train.seq_len=2048", "model.max_position_embeddings=2048", "data.eval_fraction=0.01"]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: Dict[int, int] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *_children(proc.pid)]:
            peaks[pid] = max(peaks.get(pid, 0), _hwm_kb(pid))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{err[-3000:]}")
    (directory,) = [p for p in cache.iterdir() if (p / "meta.json").is_file()]
    meta = json.loads((directory / "meta.json").read_text())
    tokens = meta["stats"]["tokens"]
    return {"workers": workers, "wall_s": round(time.perf_counter() - start, 2),
            "build_s": meta["tokenize_seconds"], "tokens": tokens, "tokens_per_s": round(tokens / meta["tokenize_seconds"]),
            "peak_rss_mb": round(peaks.get(proc.pid, 0) / 1024, 1),
            "tree_rss_mb": round(sum(peaks.values()) / 1024, 1), "cache": str(directory), "digest": digest(directory)}


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for split in ("train", "eval"):
        for name in ("tokens.npy", "doc_offsets.npy"):
            with open(directory / split / name, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def run_datasets_map(corpus: Path, tokenizer: Path, scratch: Path) -> Dict[str, Any]:
    """The baseline in a fresh process: load_dataset + map(batched, num_proc=2), as a user would write it."""
    code = f"""
import json, time, datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained({str(tokenizer)!r})
start = time.perf_counter()
ds = datasets.load_dataset("json", data_files={str(corpus)!r}, split="train", cache_dir={str(scratch)!r})
out = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, num_proc=2, remove_columns=["text"])
seconds = time.perf_counter() - start  # the tokens are on disk (Arrow), as ours are: counting them is not timed
import pyarrow.compute as pc
column = out.data.column("input_ids")
tokens = int(pc.sum(pc.list_value_length(column)).as_py()) + len(out)  # + eos per document, as ours counts
print(json.dumps({{"seconds": seconds, "tokens": tokens}}))
"""
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"datasets baseline failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": round(result["seconds"], 2), "tokens": result["tokens"],
            "tokens_per_s": round(result["tokens"] / result["seconds"])}


def bench(size_mb: float, root: Path, tokenizer: Path, identical: bool) -> Dict[str, Any]:
    corpus = root / f"corpus-{size_mb:g}mb.jsonl"
    generate(corpus, size_mb, seed=int(size_mb))
    row: Dict[str, Any] = {"size_mb": round(corpus.stat().st_size / 1e6, 1)}
    row["ours_2"] = run_prepare(corpus, tokenizer, root / f"cache-{size_mb:g}-2", 2)
    if identical:
        row["ours_1"] = run_prepare(corpus, tokenizer, root / f"cache-{size_mb:g}-1", 1)
        row["identical_1_vs_2"] = row["ours_1"]["digest"] == row["ours_2"]["digest"]
    row["datasets_map_2"] = run_datasets_map(corpus, tokenizer, root / f"hf-{size_mb:g}")
    corpus.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs=2, default=[20, 200])
    parser.add_argument("--identical-large", action="store_true", help="also build the large cache with 1 worker")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "prepare_bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        root = Path(tmp)
        sample = root / "sample.jsonl"
        generate(sample, 2, seed=99)
        train_tokenizer(sample, root / "tokenizer")
        small, large = args.sizes_mb
        rows = []
        for size, identical in ((small, True), (large, args.identical_large)):
            rows.append(bench(size, root, root / "tokenizer", identical))
            print(json.dumps(rows[-1]), flush=True)  # partial results survive an interrupted run
    ratio = rows[1]["ours_2"]["peak_rss_mb"] / rows[0]["ours_2"]["peak_rss_mb"]
    tree_ratio = rows[1]["ours_2"]["tree_rss_mb"] / rows[0]["ours_2"]["tree_rss_mb"]
    print(f"{'corpus':>8} {'ours 2w tok/s':>14} {'datasets.map 2p':>16} {'x':>5} {'peak RSS MB':>12} "
          f"{'tree RSS MB':>12} {'1w == 2w':>9}")
    for row in rows:
        ours, base = row["ours_2"], row["datasets_map_2"]
        print(f"{row['size_mb']:>6} MB {ours['tokens_per_s']:>14,} {base['tokens_per_s']:>16,} "
              f"{ours['tokens_per_s'] / base['tokens_per_s']:>5.2f} {ours['peak_rss_mb']:>12} {ours['tree_rss_mb']:>12} "
              f"{str(row.get('identical_1_vs_2', '-')):>9}")
    print(f"peak RSS {rows[1]['size_mb']} MB / {rows[0]['size_mb']} MB: {ratio:.2f}x (process tree {tree_ratio:.2f}x); "
          "target <= 1.3x")
    args.out.write_text(json.dumps({"rows": rows, "rss_ratio": ratio, "tree_rss_ratio": tree_ratio}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
