"""Identity of a tokenized cache: content fingerprints of the data files, the tokenizer's identity and the key.

Stdlib only: the login node (``python -m launcher.prepare``, the dry run's "steps per epoch", the launcher deciding
whether a GPU job must wait for a prepare job) computes the same key as every rank of the job, without torch,
transformers or reading the whole corpus.

A file's fingerprint is its size and the SHA-256 of its first and last MiB: an edit anywhere near either end, or one
that changes the size, gives a new key, and computing it reads 2 MiB whatever the file's size. ``data.verify=true``
also compares the full SHA-256 the builder stored (``full_sha256``) before a cache is reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

# Bump when the arrays written for the same inputs would change (templates, packing, layout).
CACHE_VERSION = 2
# Bump when train_bpe_tokenizer would train another tokenizer on the same texts.
TRAINED_TOKENIZER_VERSION = 1
EDGE_BYTES = 1 << 20
META_FILE = "meta.json"
# Files of a Hugging Face tokenizer directory that decide its ids (hashed by content).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "added_tokens.json")


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Path, size and the SHA-256 of the first and last MiB (the whole file when it is smaller than 2 MiB)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(EDGE_BYTES)).hexdigest()
        f.seek(max(0, size - EDGE_BYTES))
        tail = hashlib.sha256(f.read(EDGE_BYTES)).hexdigest()
    return {"path": str(path), "size": size, "head_sha256": head, "tail_sha256": tail}


def full_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_identity(source: Optional[Path], trained_on: Iterable[Path], *, vocab_size: int,
                       max_positions: int) -> dict[str, Any]:
    """What decides the tokenizer's ids: a local directory's tokenizer files by content, or, for the BPE the run
    trains (launcher.train.tokenizer), the data it trains on and its settings (training is deterministic)."""
    if source is not None:
        files = {name: hashlib.sha256((source / name).read_bytes()).hexdigest()
                 for name in TOKENIZER_FILES if (source / name).is_file()}
        return {"directory_files": files}
    return {"trained_bpe": TRAINED_TOKENIZER_VERSION, "vocab_size": int(vocab_size),
            "max_positions": int(max_positions), "data": [file_fingerprint(p) for p in trained_on]}


def cache_components(data: Mapping[str, Any], files: list[Path], fmt: str, tokenizer: Mapping[str, Any],
                     seq_len: int, seed: int, templates: list[str]) -> dict[str, Any]:
    """Everything the cached arrays depend on (one source: one cache)."""
    return {
        "version": CACHE_VERSION,
        "files": [file_fingerprint(f) for f in files],
        "format": fmt,
        "tokenizer": dict(tokenizer),
        "seq_len": int(seq_len),
        "train_on_prompt": bool(data.get("train_on_prompt", False)),
        "eval_fraction": float(data.get("eval_fraction", 0.0)),
        "seed": int(seed),
        "templates": templates,
    }


def cache_key(components: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:20]


def read_meta(directory: Path) -> Optional[dict[str, Any]]:
    """The cache's meta.json (written last: its presence marks a complete cache), or None."""
    try:
        return json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def stale_files(meta: Mapping[str, Any], files: list[Path]) -> list[str]:
    """Files whose full SHA-256 differs from the one the builder recorded (``data.verify=true``)."""
    recorded = meta.get("full_sha256", {})
    return [str(f) for f in files if recorded.get(str(f)) != full_sha256(f)]


def describe_match(components: Mapping[str, Any], *, verified: bool) -> str:
    """What a reused cache matched, for the log line that says it is reused."""
    files = components["files"]
    total = sum(f["size"] for f in files)
    how = "full SHA-256 (data.verify=true)" if verified else "size and SHA-256 of the first and last MiB"
    return f"{len(files)} file(s), {total / 1e6:.1f} MB, by {how}; tokenizer, seq_len, format, eval split, seed"


def sources_of(data: Any) -> list[tuple[str, float]]:
    """(path, weight) of each source: ``data.sources`` when set, else ``data.path`` with weight 1. ``data``: the
    DataConfig or its mapping."""
    get = data.get if isinstance(data, Mapping) else (lambda key, default=None: getattr(data, key, default))
    sources = get("sources") or []
    if not sources:
        return [(str(get("path")), 1.0)]
    weight = (lambda s: s.get("weight", 1.0)) if isinstance(sources[0], Mapping) else (lambda s: s.weight)
    path = (lambda s: s["path"]) if isinstance(sources[0], Mapping) else (lambda s: s.path)
    return [(str(path(s)), float(weight(s))) for s in sources]


def run_tokenizer_identity(model: Any, data: Any) -> dict[str, Any]:
    """The identity of the tokenizer a run uses (``tokenizer_identity``), from its model and data sections."""
    from launcher.train.data_formats import resolve_data_files

    get = model.get if isinstance(model, Mapping) else (lambda key: getattr(model, key))
    directory = get("tokenizer") or get("pretrained")
    files = [f for path, _ in sources_of(data) for f in resolve_data_files(path)]
    return tokenizer_identity(Path(directory).expanduser() if directory else None, files,
                              vocab_size=get("vocab_size"), max_positions=get("max_position_embeddings"))


def cache_root_for(data: Any, output_dir: str | Path) -> Path:
    """data.cache_dir, else <output_dir>/.cache/tokenized (shared by every run under output_dir)."""
    get = data.get if isinstance(data, Mapping) else (lambda key: getattr(data, key))
    return Path(get("cache_dir") or Path(output_dir) / ".cache" / "tokenized").expanduser()
