"""THE evaluation of a split, shared by the training loop (``Trainer.evaluate``) and ``python -m launcher.evaluate``,
so that a perplexity computed after training is exp() of the loss the loop logged on the same rows.

Causal LM: the loss is token-weighted, sum over batches of (mean loss x predicted tokens) / predicted tokens, where a
row of n real tokens predicts n - 1 of them (labels shift by one inside the model). A plain mean of batch means would
weigh a short padded batch like a full one. Classification: ``launcher.train.classification.evaluate``.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from launcher.train.batches import to_device


def evaluate_split(model: Any, split: Any, batches: List[List[int]], device: torch.device,
                   world_size: int) -> Dict[str, float]:
    """{"eval_loss": ...} (and eval_accuracy, eval_f1 for a labelled split) over every rank's ``batches``.

    Collective when ``world_size > 1`` (one all-reduce): every rank must pass the same number of batches. The
    caller puts the model in eval mode."""
    from launcher.train.classification import LabelledSplit, evaluate

    if isinstance(split, LabelledSplit):
        return evaluate(model, split, batches, device, world_size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for indices in batches:
            batch = to_device(split.collate(indices, skip_full_mask=True), device)
            tokens = (batch["labels"][:, 1:] != -100).sum()
            loss = model(**batch).loss.detach().double()
            # A batch without a predicted token has a NaN mean: it adds nothing.
            sums[0] += torch.where(tokens > 0, loss * tokens, torch.zeros_like(loss))
            sums[1] += tokens
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    total, tokens = sums.tolist()
    return {"eval_loss": total / tokens if tokens else float("nan"), "eval_tokens": int(tokens)}


def all_rows(num_rows: int, batch_size: int) -> List[List[int]]:
    """Every row once, in order, in batches of ``batch_size`` (the last one shorter): a single process's pass."""
    return [list(range(start, min(start + batch_size, num_rows))) for start in range(0, num_rows, batch_size)]
