"""``task=classification`` in the job: labelled splits, the model config's labels, and the evaluation metrics.

Each record is one example: its text tokenized as the ``text-classification`` pipeline will tokenize it later (the
tokenizer's own special tokens, truncated to ``train.seq_len``), right-padded with the pad token. The model is
``AutoModelForSequenceClassification`` (``launcher.train.modeling.model_class``): decoder models pool the last token
that is not padding, which is why ``pad_token_id`` must be set in the model config. Every rank reads and tokenizes
the (small) labelled file itself: the result is deterministic, so no cache and no barrier is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from launcher.train.labelled_data import iter_labelled, label_names
from launcher.train.packed import PaddedRows

if TYPE_CHECKING:
    from launcher.config.schema import DataConfig, TaskConfig

FORMAT = "classification"  # DatasetSplits.format of labelled splits (the loop's evaluation dispatches on it)


class LabelledSplit(PaddedRows):
    """One split in memory: rows of ``seq_len`` token ids (right-padded), real lengths, one class id per row."""

    def __init__(self, input_ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray, num_labels: int) -> None:
        self.input_ids, self.lengths, self.labels = input_ids, lengths, labels
        self.num_labels = num_labels

    def collate(self, indices: List[int], *, skip_full_mask: bool = False) -> Dict[str, torch.Tensor]:
        """input_ids and attention_mask (batch, seq_len), labels (batch,). The mask is always there: rows differ in
        length (``skip_full_mask`` is accepted for the loop's interface)."""
        idx = np.asarray(indices, dtype=np.int64)
        mask = np.arange(self.seq_len)[None, :] < self.lengths[idx][:, None]
        return {
            "input_ids": torch.from_numpy(self.input_ids[idx].astype(np.int64)),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(self.labels[idx].astype(np.int64)),
        }


@dataclass
class LabelledSplits:
    train: LabelledSplit
    eval: LabelledSplit
    labels: List[str]  # class id -> label name
    format: str = FORMAT
    from_cache: bool = False
    meta: Dict[str, Any] = field(default_factory=dict)


def read_labels(data: "DataConfig", task: "TaskConfig") -> List[str]:
    """The sorted label set of the whole data file (the model's class ids)."""
    names = label_names([label for _, label in iter_labelled(data.path, task.text_field, task.label_field)])
    if len(names) < 2:
        raise ValueError(f"data.path={data.path}: task.label_field={task.label_field!r} has the one label "
                         f"{names}; classification needs at least two")
    return names


def pad_id(tokenizer: Any) -> int:
    """The pad token, else eos: the model's pooling finds the last token that is not this id."""
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if value is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: classification needs one to pad with")
    return int(value)


def configure(config: Any, labels: Sequence[str], tokenizer: Any) -> Any:
    """The transformers config with the label set (id2label, label2id) and the pad token id."""
    config.id2label = {i: name for i, name in enumerate(labels)}
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.num_labels = len(labels)
    config.problem_type = "single_label_classification"
    config.pad_token_id = pad_id(tokenizer)
    return config


def prepare_splits(data: "DataConfig", task: "TaskConfig", tokenizer: Any, seq_len: int, *, seed: int,
                   labels: Optional[Sequence[str]] = None) -> LabelledSplits:
    """Train and eval splits of the labelled file (eval: a seeded ``data.eval_fraction`` of the records)."""
    from launcher.train.data import split_indices

    records = list(iter_labelled(data.path, task.text_field, task.label_field))
    names = list(labels) if labels is not None else label_names([label for _, label in records])
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for _, label in records} - set(ids))
    if unknown:
        raise ValueError(f"data.path={data.path}: labels {unknown[:5]} are not among the model's {names}")
    encoded = tokenizer([text for text, _ in records], truncation=True, max_length=seq_len,
                        return_attention_mask=False, verbose=False)["input_ids"]
    rows = _pad(encoded, seq_len, pad_id(tokenizer))
    classes = np.array([ids[label] for _, label in records], dtype=np.int64)
    train_idx, eval_idx = split_indices(len(records), float(data.eval_fraction), seed,
                                        what=f"labelled records in {data.path}")
    split = {name: LabelledSplit(rows[0][idx], rows[1][idx], classes[idx], len(names))
             for name, idx in (("train", train_idx), ("eval", eval_idx))}
    meta = {"records": len(records), "labels": names, "at_seq_len": int(sum(len(e) >= seq_len for e in encoded))}
    return LabelledSplits(train=split["train"], eval=split["eval"], labels=names, meta=meta)


def _pad(encoded: List[List[int]], seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.full((len(encoded), seq_len), pad, dtype=np.int32)
    lengths = np.zeros(len(encoded), dtype=np.int32)
    for row, ids in enumerate(encoded):
        k = min(len(ids), seq_len)
        input_ids[row, :k] = ids[:k]
        lengths[row] = k
    return input_ids, lengths


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def confusion_counts(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """A flattened (true, predicted) count matrix of one batch, on the device (no host sync)."""
    predicted = logits.argmax(dim=-1)
    return torch.bincount(labels * num_labels + predicted, minlength=num_labels * num_labels).float()


def scores(confusion: np.ndarray) -> Dict[str, float]:
    """Accuracy and macro-F1 from a (true, predicted) matrix; F1 averages the classes that occur as a true or a
    predicted label (as scikit-learn's ``f1_score(average="macro")``)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    tp = np.diag(confusion)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)  # 2 tp + fp + fn
    present = denominator > 0
    f1 = np.where(present, 2 * tp / np.where(present, denominator, 1), 0.0)
    return {"eval_accuracy": float(tp.sum() / total) if total else float("nan"),
            "eval_f1": float(f1[present].mean()) if present.any() else float("nan")}


def evaluate(model: Any, split: LabelledSplit, batches: List[List[int]], device: torch.device,
             world_size: int) -> Dict[str, float]:
    """eval_loss (mean over examples), eval_accuracy and eval_f1 over every rank's ``batches``. Collective when
    ``world_size > 1``: every rank must pass the same number of batches."""
    from launcher.train.batches import to_device

    num_labels = split.num_labels
    sums = torch.zeros(2 + num_labels * num_labels, dtype=torch.float32, device=device)
    with torch.no_grad():
        for indices in batches:
            batch = to_device(split.collate(indices), device)
            out = model(**batch)
            sums[0] += out.loss.detach().float() * len(indices)
            sums[1] += len(indices)
            sums[2:] += confusion_counts(out.logits.detach(), batch["labels"], num_labels)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    host = sums.cpu().numpy()
    return {"eval_loss": float(host[0] / max(host[1], 1.0)),
            **scores(host[2:].reshape(num_labels, num_labels))}
