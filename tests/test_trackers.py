"""Experiment trackers (train.trackers): the login node's checks, the records they get, the W&B sync hint of
``launcher.status``, and a 2-rank CPU run with W&B (offline) and MLflow (file store) stopped by SIGTERM and resumed
into the same tracker runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from launcher.errors import ConfigError
from launcher.rundir import TRACKERS_FILE
from launcher.train.trackers import Trackers, scalars_of, tracker_names
from login_helpers import REPO, composed, config

# ------------------------------------------------------------------------------------------------ the login node


@pytest.mark.parametrize("overrides,field,allowed", [
    (["train.trackers=[neptune]"], "train.trackers[0]", "one of tensorboard, wandb, mlflow"),
    (["train.trackers=[wandb,wandb]"], "train.trackers", "each tracker at most once"),
    (["train.mlflow_tracking_uri=http://mlflow.example:5000"], "train.mlflow_tracking_uri", "only with mlflow"),
])
def test_bad_tracker_settings_are_refused(overrides, field, allowed):
    with pytest.raises(ConfigError) as error:
        config(overrides)
    assert error.value.field == field and allowed in str(error.value)


def test_a_tracking_uri_with_a_password_is_refused():
    with pytest.raises(ConfigError) as error:
        config(["train.trackers=[mlflow]", "train.mlflow_tracking_uri=https://me:hunter2@mlflow.example"])
    assert "hunter2" not in str(error.value) and "credentials" in str(error.value)


def test_a_missing_tracker_package_is_refused_before_the_job():
    from launcher.config.check_values import check_packages

    tree = composed(["train.trackers=[tensorboard,wandb]"])
    with pytest.raises(ConfigError) as error:
        check_packages(tree, find=lambda name: None if name == "wandb" else object())
    assert error.value.field == "train.trackers" and "eurohpc-launcher[wandb]" in str(error.value)
    # A container job whose image is not on this machine: the job checks when it starts.
    check_packages(composed(["+cluster=lumi", "train.trackers=[wandb]"]), find=lambda name: None)


def test_a_container_job_asks_the_image_s_python(tmp_path, monkeypatch):
    """A container job: the image's packages count. A fake runtime stands in for singularity: it runs the probe in a
    Python without site-packages, as an image without wandb would."""
    from launcher.config.check_values import check_packages

    runtime = tmp_path / "bin" / "singularity"
    runtime.parent.mkdir()
    runtime.write_text(f'#!/bin/sh\nwhile [ "$1" != "-c" ]; do shift; done\nexec {sys.executable} -S "$@"\n')
    runtime.chmod(0o755)
    image = tmp_path / "image.sif"
    image.write_text("")
    monkeypatch.setenv("PATH", f"{runtime.parent}{os.pathsep}{os.environ['PATH']}")
    tree = composed(["+cluster=lumi", "train.trackers=[wandb]", f"cluster.container.image={image}"])
    with pytest.raises(ConfigError) as error:
        check_packages(tree, find=lambda name: object())  # this Python has it: it does not count
    assert error.value.field == "train.trackers" and "wandb installed in the Python that runs the job (the image)" in (
        str(error.value))
    image.unlink()  # the image is not on this machine: the job checks when it starts
    check_packages(tree)


def test_tensorboard_true_is_the_tensorboard_tracker():
    assert tracker_names([], True) == ["tensorboard"]
    assert tracker_names(["wandb", "tensorboard"], True) == ["wandb", "tensorboard"]
    assert tracker_names(["mlflow"], False) == ["mlflow"]


# ------------------------------------------------------------------------------------------------ what trackers get


def test_records_become_named_scalars():
    train = {"step": 3, "loss": 2.5, "lr": 1e-3, "mfu": None, "tokens_per_s": 10.0, "world_size": 2}
    assert scalars_of(train) == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 10.0}
    assert scalars_of({"step": 4, "eval_loss": 2.0, "eval_batches": 2}) == {"eval/loss": 2.0}
    assert scalars_of({"step": 4, "event": "checkpoint", "save_s": 0.5, "size_gb": 0.1}) == {
        "checkpoint/save_s": 0.5, "checkpoint/size_gb": 0.1}


class _Recorder:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail, self.logged, self.closed = name, fail, [], None

    def log(self, scalars: Dict[str, float], step: int) -> None:
        if self.fail:
            raise OSError("disk full")
        self.logged.append((step, scalars))

    def close(self, finished: bool) -> None:
        self.closed = finished


def test_a_failing_tracker_warns_once_and_training_goes_on():
    good, bad, warnings = _Recorder("good"), _Recorder("bad", fail=True), []
    trackers = Trackers([bad, good], warn=warnings.append)
    trackers.write({"step": 1, "loss": 3.0})
    trackers.write({"step": 2, "loss": 2.0})
    trackers.close(finished=True)
    assert good.logged == [(1, {"train/loss": 3.0}), (2, {"train/loss": 2.0})] and good.closed is True
    assert len(warnings) == 1 and "tracker bad failed (OSError: disk full)" in warnings[0]


def test_tensorboard_alias_and_mlflow_reopen_in_process(tmp_path):
    """train.tensorboard=true writes the tensorboard tracker; a second open continues the MLflow run of trackers.json."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launcher.train.trackers import open_trackers

    cfg = config(["train.tensorboard=true", "train.trackers=[mlflow]", f"output_dir={tmp_path}"])
    for steps, finished in (((1, 2), False), ((3,), True)):  # two attempts
        trackers = open_trackers(cfg, tmp_path, is_main=True, warn=pytest.fail)
        assert [t.name for t in trackers.trackers] == ["mlflow", "tensorboard"]
        for step in steps:
            trackers.write({"step": step, "loss": 1.0 / step, "mfu": None})
        trackers.write({"step": steps[-1], "eval_loss": 0.5})
        trackers.close(finished=finished)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3] and "eval/loss" in events.Tags()["scalars"]
    run_id = json.loads((tmp_path / TRACKERS_FILE).read_text())["mlflow"]["run_id"]
    assert _mlflow_losses(tmp_path) == {run_id: {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}}
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri()).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.tensorboard"] == "True"


# ------------------------------------------------------------------------------------------------ status: wandb sync


def _finished_run(root: Path, name: str) -> Path:
    run = root / name
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text(f"run_name: {name}\ncluster: null\ntrain: {{max_steps: 8}}\n")
    return run


def test_status_prints_wandb_sync_for_finished_runs_until_synced(tmp_path):
    from launcher.status.runs import collect

    run = _finished_run(tmp_path, "done")
    attempts = [run / "wandb" / f"offline-run-2026120{i}_000000-abc" for i in (1, 2)]
    for attempt in attempts:
        attempt.mkdir(parents=True)
        (attempt / "run-abc.wandb").write_bytes(b"x")
    running = tmp_path / "running"  # not finished: nothing to upload yet
    (running / "wandb" / "offline-run-20261201_000000-def").mkdir(parents=True)
    (running / "wandb" / "offline-run-20261201_000000-def" / "run-def.wandb").write_bytes(b"x")
    (running / "config.yaml").write_text("run_name: running\ncluster: null\n")
    _, notes = collect(tmp_path)
    sync = [note for note in notes if "wandb sync" in note]
    assert sync == [f"done: W&B ran offline; upload it from the login node: wandb sync {attempts[0]} {attempts[1]}"]
    for attempt in attempts:
        (attempt / "run-abc.wandb.synced").write_text("")
    assert not [note for note in collect(tmp_path)[1] if "wandb sync" in note]


# ------------------------------------------------------------------------------------------------ end to end


def _wandb_records(path: Path) -> List[bytes]:
    """The records of a .wandb file: W&B's header (":W&B", magic, version), then LevelDB's log format (32 KiB blocks
    of records with a 7-byte header: crc32, length, type full/first/middle/last)."""
    data, block, pos, out, pending = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out


def _wandb_history(run_dir: Path) -> List[Dict[str, object]]:
    """(run id, step, train/loss) of every history row in the offline .wandb files, parsed with wandb's protobuf."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/*.wandb")):
        run_id = None
        for data in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                if "train/loss" in items:
                    rows.append({"run": run_id, "step": items["_step"], "loss": items["train/loss"]})
    return rows


def _mlflow_losses(run_dir: Path) -> Dict[str, Dict[int, float]]:
    """run id -> {step: train/loss} from the file store's metric files (``<time> <value> <step>`` lines)."""
    out = {}
    for path in (run_dir / "mlruns").glob("*/*/metrics/train/loss"):
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        out[path.parents[2].name] = {int(step): float(value) for _, value, step in rows}
    return out


@pytest.mark.slow
def test_wandb_and_mlflow_continue_the_same_runs_after_sigterm(train_launcher):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from conftest import check_ok, losses
    from test_train_resume import STOP_OVERRIDES, stop_torchrun

    run_dir = train_launcher.make_run("trackers", ["strategy=ddp", "train.trackers=[wandb,mlflow]",
                                                   *STOP_OVERRIDES])
    out = stop_torchrun(train_launcher, run_dir)
    assert "after a checkpoint: exit 3" in out, out[-3000:]
    first = json.loads((run_dir / TRACKERS_FILE).read_text())
    check_ok(train_launcher.spawn(run_dir))
    assert json.loads((run_dir / TRACKERS_FILE).read_text()) == first  # the second attempt reused both ids

    expected = losses(run_dir)  # metrics.jsonl: one curve, steps 1..8
    assert sorted(expected) == list(range(1, 9))
    history = _wandb_history(run_dir)
    assert {row["run"] for row in history} == {first["wandb"]["id"]}  # both attempts: one W&B run
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    by_step = {row["step"]: row["loss"] for row in history}
    assert by_step == pytest.approx(expected, rel=1e-6), history
    mlflow = _mlflow_losses(run_dir)
    assert list(mlflow) == [first["mlflow"]["run_id"]]  # one MLflow run, appended to by the second attempt
    assert mlflow[first["mlflow"]["run_id"]] == pytest.approx(expected, rel=1e-6)

    status = subprocess.run([sys.executable, "-m", "launcher.status", str(run_dir.parent)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert f"{run_dir.name}: W&B ran offline" in status.stderr and "wandb sync" in status.stderr, status.stderr
