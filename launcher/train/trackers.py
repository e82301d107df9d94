"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, written by rank 0 (docs/tracking.md).

Every record of ``metrics.jsonl`` (``launcher.train.metrics.MetricsFile.write``) is also sent to each tracker as
scalars at its step: ``train/<key>`` (loss, lr, grad_norm, tokens_per_s, mfu, ...), ``eval/loss`` and
``<event>/<key>`` (checkpoint save times, straggler reports). The run name and the resolved config are logged once.

* W&B: offline unless ``WANDB_MODE`` says otherwise (compute nodes have no internet), into ``<run_dir>/wandb``;
  ``wandb sync`` on the login node uploads it afterwards (``python -m launcher.status`` prints the command).
* MLflow: ``train.mlflow_tracking_uri``, else a file store ``file:<run_dir>/mlruns``. Credentials only through the
  environment (``MLFLOW_TRACKING_TOKEN``, ...), never the config.

Requeued attempts continue the same tracker run: the ids are kept in ``<run_dir>/trackers.json`` (W&B: a fixed id
with ``resume="allow"``; MLflow: the ``run_id``). A tracker that fails while training warns once and is dropped:
tracking never stops a job. Stdlib only at import (``launcher.status`` reads the names below).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence

from launcher.rundir import MLFLOW_DIR, TRACKERS_FILE

if TYPE_CHECKING:
    from launcher.config.schema import LauncherConfig, TrainConfig

# Keys of a record that are not scalars to plot.
_NOT_SCALARS = ("step", "event", "world_size")


class Tracker(Protocol):
    name: str

    def log(self, scalars: Dict[str, float], step: int) -> None: ...

    def close(self, finished: bool) -> None: ...


def tracker_names(trackers: Sequence[str], tensorboard: bool) -> List[str]:
    """``train.trackers``, plus tensorboard for the older ``train.tensorboard=true``; each once, in order. The login
    node's package check (``launcher.config.check_values``) and the job use this one rule."""
    return list(dict.fromkeys([*trackers, *(["tensorboard"] if tensorboard else [])]))


def missing_packages(names: List[str], find: Callable[[str], Any] = importlib.util.find_spec) -> List[str]:
    """The trackers whose package (it has the tracker's name) this interpreter cannot import."""
    return [name for name in names if find(name) is None]


def scalars_of(record: Dict[str, Any]) -> Dict[str, float]:
    """The finite numbers of one metrics.jsonl record, named by what the record is (train, eval, an event)."""
    if "event" in record:
        prefix = f"{record['event']}/"
    elif "eval_loss" in record:
        return _finite({"eval/loss": record["eval_loss"]})
    else:
        prefix = "train/"
    return _finite({prefix + key: value for key, value in record.items() if key not in _NOT_SCALARS})


def _finite(values: Dict[str, Any]) -> Dict[str, float]:
    return {key: float(value) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def flat_config(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train.lr": 0.003, ...}``: MLflow params are flat; lists become their text."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


class Trackers:
    """The open trackers of this rank (none but on rank 0); ``write`` takes a metrics.jsonl record."""

    def __init__(self, trackers: List[Tracker], warn: Callable[[str], None] = print) -> None:
        self.trackers = list(trackers)
        self.warn = warn

    def write(self, record: Dict[str, Any]) -> None:
        scalars = scalars_of(record)
        if scalars and "step" in record:
            self._each(lambda tracker: tracker.log(scalars, int(record["step"])))

    def close(self, finished: bool) -> None:
        self._each(lambda tracker: tracker.close(finished))
        self.trackers = []

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 - a tracker's own failure (disk, service): training goes on
                self.trackers.remove(tracker)
                self.warn(f"WARNING: tracker {tracker.name} failed ({type(error).__name__}: {error}); "
                          "training continues without it")


# ---------------------------------------------------------------------------------------------------------------
# The run ids kept for the next attempt


def read_ids(run_dir: Path) -> Dict[str, Any]:
    try:
        data = json.loads((run_dir / TRACKERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_ids(run_dir: Path, ids: Dict[str, Any]) -> None:
    path = run_dir / TRACKERS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ids, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The trackers


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path, run_name: str, config: Dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", f"run {run_name}\n\n    " + json.dumps(config, indent=1, default=str)
                             .replace("\n", "\n    "))

    def log(self, scalars: Dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, run_id: str, run_name: str, project: str, config: Dict[str, Any]) -> None:
        import wandb

        # Offline unless the user chose otherwise: compute nodes have no internet, and an online init would wait.
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(
            project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir), config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log(self, scalars: Dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 3)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_id: Optional[str], run_name: str,
                 config: Dict[str, Any]) -> None:
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked: it is the one store that
            # needs no server and no database on a parallel file system (SQLite's locking is unreliable on Lustre).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self._log_params(flat_config(config))

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - MlflowException: another store, or the run was deleted
            return False

    def _log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # the store's batch limit
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log(self, scalars: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in scalars.items()])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def mlflow_uri(train: "TrainConfig", run_dir: Path) -> str:
    return train.mlflow_tracking_uri or (run_dir / MLFLOW_DIR).resolve().as_uri()


def open_trackers(cfg: "LauncherConfig", run_dir: Path, *, is_main: bool,
                  warn: Callable[[str], None] = print) -> Trackers:
    """The trackers of ``train.trackers`` on rank 0 (an empty ``Trackers`` elsewhere), continuing the runs of an
    earlier attempt. A tracker that cannot start warns and is left out."""
    names = tracker_names(cfg.train.trackers, cfg.train.tensorboard)
    missing = missing_packages(names)
    if missing:  # on every rank, so all of them stop; the login node checks where it sees the job's Python
        from launcher.errors import ConfigError

        raise ConfigError("train.trackers", missing, "trackers whose package is installed in the job's Python",
                          f"pip install {' '.join(missing)} (the extras: eurohpc-launcher[{','.join(missing)}])")
    if not names or not is_main:
        return Trackers([], warn)
    from dataclasses import asdict

    config, ids = asdict(cfg), read_ids(run_dir)
    opened: List[Tracker] = []
    for name in names:
        try:
            opened.append(_open_one(name, cfg, run_dir, config, ids))
        except Exception as error:  # noqa: BLE001 - the tracker's own start-up failure
            warn(f"WARNING: tracker {name} could not start ({type(error).__name__}: {error}); training continues "
                 "without it")
    write_ids(run_dir, ids)
    return Trackers(opened, warn)


def _open_one(name: str, cfg: "LauncherConfig", run_dir: Path, config: Dict[str, Any],
              ids: Dict[str, Any]) -> Tracker:
    """One tracker; ``ids`` gets the run id it used (the next attempt continues that run)."""
    from launcher.rundir import TENSORBOARD_DIR

    train = cfg.train
    if name == "tensorboard":
        return TensorBoardTracker(run_dir / TENSORBOARD_DIR, cfg.run_name, config)
    if name == "wandb":
        import uuid

        ids.setdefault("wandb", {"id": uuid.uuid4().hex[:12]})
        return WandbTracker(run_dir, ids["wandb"]["id"], cfg.run_name, train.tracker_project, config)
    uri = mlflow_uri(train, run_dir)
    known = ids.get("mlflow") or {}
    tracker = MlflowTracker(uri, train.tracker_project, known.get("run_id") if known.get("uri") == uri else None,
                            cfg.run_name, config)
    ids["mlflow"] = {"run_id": tracker.run_id, "uri": uri}
    return tracker
