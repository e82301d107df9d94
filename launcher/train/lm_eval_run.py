"""``python -m launcher.evaluate RUN_DIR --lm-eval TASKS``: lm-evaluation-harness on a run's export, offline.

lm-eval is an optional extra (``pip install '.[eval]'``). Compute nodes have no network, so every task's dataset must
already be in the local Hugging Face datasets cache (or be a local file, as in a task YAML of your own given with
``--lm-eval-include``): each task is loaded first, and the command names the tasks whose data is missing before it
evaluates anything.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, List, Optional

from launcher.errors import UserError


def check_lm_eval(tasks: str, include: Optional[str]) -> List[str]:
    """The task names; UserError when lm-eval is not installed or a task is unknown to it (no torch import)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--lm-eval", tasks, "no task names", "comma-separated lm-eval task names")
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--lm-eval", tasks, "lm-evaluation-harness is not installed",
                        "pip install '.[eval]' (or pip install lm-eval) where the evaluation runs")
    return names


def _task_manager(include: Optional[str]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include) if include else TaskManager()


def load_tasks(names: List[str], include: Optional[str]) -> Dict[str, Any]:
    """lm-eval's task dict; UserError naming every unknown task and every task whose dataset is not local."""
    from lm_eval.tasks import get_task_dict

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ[name] = "1"
    manager = _task_manager(include)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError("--lm-eval", ",".join(unknown), "unknown lm-eval task(s)",
                        "see lm-eval --tasks list, or give your own task YAMLs with --lm-eval-include DIR")
    tasks, missing = {}, []
    for name in names:
        try:
            tasks.update(get_task_dict([name], manager))
        except Exception as error:  # noqa: BLE001 - datasets' offline errors have many types
            missing.append(f"{name} ({type(error).__name__}: {str(error).splitlines()[0][:160]})")
    if missing:
        raise UserError("--lm-eval", ",".join(names),
                        "datasets not in the local cache (offline): " + "; ".join(missing),
                        "download them on a machine with network into the HF cache the job uses (HF_HOME)")
    return tasks


def run_lm_eval(export: Any, names: List[str], *, include: Optional[str] = None, limit: Optional[int] = None,
                choice: str = "auto") -> Dict[str, Any]:
    """{"lm_eval": {"<task>/<metric>": value}, ...}: lm-eval's simple_evaluate on the export (a LoRA adapter is
    merged in memory first: lm-eval takes a plain transformers model)."""
    import time

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from launcher.train import inference

    started = time.perf_counter()
    tasks = load_tasks(names, include)
    loaded = inference.load(export, choice)
    model = loaded.model.merge_and_unload() if loaded.weights == "adapter" else loaded.model
    lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=8, device=str(loaded.device))
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), limit=limit, log_samples=False)
    scores = {}
    for task, metrics in (output or {}).get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in key:
                scores[f"{task}/{key.split(',')[0]}"] = float(value)
    return {"data": ",".join(names), "split": "lm-eval", "rows": limit, "weights": loaded.weights,
            "lm_eval": scores, "seconds": round(time.perf_counter() - started, 3), "created_unix": time.time()}
