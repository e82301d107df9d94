"""Packed splits read from the cache's flat token arrays, and a concatenation of several (a mixture's sources).

Row ``r`` of a packed split is tokens ``[r * seq_len, (r + 1) * seq_len)`` of the split's documents joined (each ends
with eos), so rows are cut at read time from one memory-mapped array: no second copy as a 2-D table, and any
``seq_len`` could read the same tokens. The last row is right-padded (attention_mask 0, labels -100).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # older numpy cannot memory-map an empty array
        return np.load(path)


class PaddedRows:
    """A split stored as rows: ``input_ids`` (n, seq_len), right-padded, and ``lengths`` (n,), the real tokens per row
    (the supervised and the labelled splits)."""

    input_ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the split."""
        return int(self.lengths.sum())


class PackedSplit:
    """``tokens.npy`` (flat ids) and ``doc_offsets.npy`` (document boundaries) of one split, as seq_len rows."""

    def __init__(self, directory: Path, *, seq_len: int, pad_id: int) -> None:
        self.directory = directory
        self.tokens = _load(directory / "tokens.npy")
        self.doc_offsets = _load(directory / "doc_offsets.npy")
        self._seq_len, self.pad_id = int(seq_len), int(pad_id)

    def __len__(self) -> int:
        return -(-int(self.tokens.shape[0]) // self._seq_len)

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1

    def rows(self, indices: "list[int] | np.ndarray") -> tuple[np.ndarray, np.ndarray]:
        """(int64 ids of shape (n, seq_len), real tokens per row)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        positions = idx[:, None] * self._seq_len + np.arange(self._seq_len)[None, :]
        n = self.num_tokens
        ids = np.asarray(self.tokens[np.minimum(positions, max(n - 1, 0))], dtype=np.int64)
        real = positions < n
        ids[~real] = self.pad_id
        return ids, real.sum(axis=1)

    def __getitem__(self, index: int) -> dict[str, "torch.Tensor"]:
        return {name: tensor[0] for name, tensor in self.collate([index]).items()}

    def collate(self, indices: list[int], *, skip_full_mask: bool = False) -> dict[str, "torch.Tensor"]:
        """As launcher.train.data.TokenizedSplit.collate: labels are the inputs, -100 on padding."""
        ids, lengths = self.rows(indices)
        return rows_batch(ids, lengths, self._seq_len, skip_full_mask)


class ConcatSplit:
    """Several packed splits as one index space: rows of part 0, then part 1, ... (a mixture's sources)."""

    def __init__(self, parts: list[PackedSplit]) -> None:
        self.parts = parts
        self.bases = np.cumsum([0, *(len(p) for p in parts)])

    def __len__(self) -> int:
        return int(self.bases[-1])

    @property
    def seq_len(self) -> int:
        return self.parts[0].seq_len

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    def collate(self, indices: list[int], *, skip_full_mask: bool = False) -> dict[str, "torch.Tensor"]:
        idx = np.asarray(indices, dtype=np.int64)
        source = np.searchsorted(self.bases, idx, side="right") - 1
        ids = np.empty((len(idx), self.seq_len), dtype=np.int64)
        lengths = np.empty(len(idx), dtype=np.int64)
        for s in np.unique(source):
            sel = source == s
            ids[sel], lengths[sel] = self.parts[s].rows(idx[sel] - self.bases[s])
        return rows_batch(ids, lengths, self.seq_len, skip_full_mask)

    def __getitem__(self, index: int) -> dict[str, "torch.Tensor"]:
        return {name: tensor[0] for name, tensor in self.collate([index]).items()}


def rows_batch(ids: np.ndarray, lengths: np.ndarray, seq_len: int, skip_full_mask: bool,
           labels: "np.ndarray | None" = None) -> dict[str, "torch.Tensor"]:
    """input_ids, labels (given, or every real token) and attention_mask of rows with ``lengths`` real tokens; no mask
    with ``skip_full_mask`` when no row is padded (transformers' causal-only path, no mask check per forward)."""
    import torch

    full = bool((lengths >= seq_len).all())
    mask = None if full else np.arange(seq_len)[None, :] < lengths[:, None]
    if labels is None:
        labels = ids.copy() if mask is None else np.where(mask, ids, IGNORE_INDEX)
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    if not (skip_full_mask and full):
        ones = np.ones(ids.shape, dtype=np.int64)
        batch["attention_mask"] = torch.from_numpy(ones if mask is None else mask.astype(np.int64))
    return batch
