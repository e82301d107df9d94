"""The work of ``python -m launcher.evaluate``: score a finished run's export on its held-out split or another file.

The rows are tokenized exactly as in training (the run's data settings, seed and ``train.seq_len``; causal-LM data
through the tokenized cache, so the held-out split is the same rows), and scored by THE evaluation
(``launcher.train.evaluation.evaluate_split``): perplexity is exp() of the token-weighted loss the training loop logs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, Optional

from launcher.train.exported import Export


def evaluate_export(export: Export, *, data_path: Optional[str] = None, batch_size: Optional[int] = None,
                    choice: str = "auto") -> Dict[str, Any]:
    """Scores of the run's model: eval_loss and perplexity (causal LM), eval_loss, eval_accuracy and eval_f1
    (classification), with what was scored (data, split, rows, weights)."""
    from launcher.train import inference
    from launcher.train.evaluation import all_rows, evaluate_split

    started = time.perf_counter()
    cfg = export.config
    loaded = inference.load(export, choice)
    split = _split(export, loaded, data_path)
    batches = all_rows(len(split), batch_size or int(cfg.train.micro_batch_size))
    values = evaluate_split(loaded.model, split, batches, loaded.device, world_size=1)
    if export.task == "causal_lm":
        values["perplexity"] = math.exp(values["eval_loss"])
    return {
        "data": data_path or cfg.data.path,
        "split": "all" if data_path else "eval",
        "rows": len(split),
        "weights": loaded.weights,
        **values,
        "seconds": round(time.perf_counter() - started, 3),
        "created_unix": time.time(),
    }


def _split(export: Export, loaded: Any, data_path: Optional[str]) -> Any:
    """The held-out split (``data_path`` None) or every row of ``data_path``."""
    cfg = export.config
    # Another file is scored whole: no held-out fraction, and its own format (detected).
    mixture = {"sources": []} if hasattr(cfg.data, "sources") else {}  # a mixture's sources give way to the file
    data = cfg.data if data_path is None else dataclasses.replace(cfg.data, path=data_path, eval_fraction=0.0,
                                                                  format=None, **mixture)
    if export.task == "classification":
        from launcher.train.classification import prepare_splits

        config = loaded.model.config
        labels = [config.id2label[i] for i in range(config.num_labels)]
        splits = prepare_splits(data, cfg.task, loaded.tokenizer, cfg.train.seq_len, seed=cfg.train.seed,
                                labels=labels)
    else:
        from launcher.train.data import cache_root_for, prepare_datasets
        from launcher.train.data_cache import run_tokenizer_identity

        values = dataclasses.asdict(data)
        # The training's cache key for its own data (a cache hit); another file: keyed on the tokenizer itself.
        ident = run_tokenizer_identity(cfg.model, cfg.data) if data_path is None else None
        splits = prepare_datasets(values, loaded.tokenizer, cfg.train.seq_len, cache_root_for(values, cfg.output_dir),
                                  seed=cfg.train.seed, is_main=True, barrier=lambda: None, tokenizer_id=ident)
    split = splits.eval if data_path is None else splits.train
    if len(split) == 0:
        from launcher.errors import UserError

        raise UserError("RUN_DIR", str(export.run_dir), f"the run held out no rows (data.eval_fraction="
                        f"{cfg.data.eval_fraction})", "pass --data FILE to score another file")
    return split
