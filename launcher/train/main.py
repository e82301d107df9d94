"""``run(run_dir)``: train (or resume, or export) the run whose resolved config is ``<run_dir>/config.yaml``.

Launch commands (each process calls ``run``; see docs/training.md):

    local, N processes:  python -m torch.distributed.run --standalone --nproc_per_node N -m launcher.train RUN_DIR
    one process:         python -m launcher.train RUN_DIR
    Slurm (srun, one task per device): each task calls launcher.train.main.run(RUN_DIR) (launcher/slurm/task.py via submitit)

Exit codes (``launcher.rundir.EXIT_*``): 0 trained (or already trained) and exported; 2 bad input (config, data, model:
the message says which key); 3 a stop signal (SIGTERM/SIGUSR2) or ``request_stop()`` arrived, every rank saved a
checkpoint: requeue and run the same command again to resume; 4 the preflight found the allocation unusable (the
message says which rank and why); anything else (an exception) is a failure.

The config is read once into the schema dataclasses (``launcher.config.load.read_run_config``); helpers get the
sections they use. ``run`` = ``_prepare`` (preflight, strategy, tokenizer, model) then ``_train`` or ``_export_only``,
which share the one resume path, ``_resume``. The setup helpers live in ``launcher.train.setup``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Tuple

from launcher.rundir import (
    CHECKPOINTS_DIR,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREFLIGHT,
    EXIT_REQUEUE,
    EXPORT_DIR,
    METRICS_FILE,
)

if TYPE_CHECKING:
    from launcher.config.schema import LauncherConfig
    from launcher.train.distributed import DistEnv


def run(run_dir: str | Path) -> int:
    """Train the run in ``run_dir``; returns the process exit code (see the module docstring)."""
    run_dir = Path(run_dir).expanduser().resolve()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from launcher.config.load import read_run_config

        cfg = read_run_config(run_dir)
    except Exception as e:  # noqa: BLE001 - absent, unreadable, or a value of the wrong type
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT

    from launcher.train import distributed as D
    from launcher.train.preflight import PreflightError
    from launcher.config.strategies import needs_cpu_collectives

    # Before the rendezvous: a time-limit or preemption signal during a slow start must only set the flag.
    restore_signals = D.install_signal_handlers()
    _watchdog().flight_recorder_env(run_dir)  # NCCL's flight-recorder dump lands in hangs/ (docs/hangs.md)
    D.clear_stop()
    try:
        # setup() applies cpu_collectives only when the device turns out to be a GPU.
        env = D.setup(cfg.cluster, cpu_collectives=needs_cpu_collectives(cfg.strategy, "cuda"))
    except Exception as e:  # noqa: BLE001 - rendezvous timeout, no GPU for nccl, ...
        restore_signals()
        print(f"train: error: cannot start the process group: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    try:
        return _run(cfg, env, run_dir)
    except _input_errors() as e:
        print(f"train: [rank {env.rank}] error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except D.PeerFailed as e:
        print(f"train: [rank {env.rank}] stopping: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except PreflightError as e:
        print(f"train: [rank {env.rank}] {e}", file=sys.stderr, flush=True)
        _watchdog().record_preflight_failure(run_dir, getattr(e, "report", None), env.rank)  # the node to exclude
        return EXIT_PREFLIGHT
    except Exception:
        print(f"train: [rank {env.rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        restore_signals()
        D.teardown()


def _watchdog() -> Any:
    from launcher.train import watchdog

    return watchdog


def _input_errors() -> tuple:
    from launcher.errors import ConfigError
    from launcher.train.checkpoint import CheckpointError
    from launcher.train.modeling import ModelInputError
    from launcher.train.strategies.base import StrategyUnavailable

    return (ConfigError, ModelInputError, StrategyUnavailable, CheckpointError, FileNotFoundError, _SetupError)


class _SetupError(ValueError):
    """A ValueError raised while reading inputs (before training starts): bad input, not a bug."""


@contextlib.contextmanager
def _as_input_error() -> Iterator[None]:
    """Inside: a plain ValueError (bad data, a model transformers refuses) becomes ``_SetupError`` (exit 2)."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, _input_errors()):
            raise
        raise _SetupError(str(e)) from e


@dataclass
class _Prepared:
    """What training and export share, built before any checkpoint is read."""

    strategy: Any
    model: Any  # the Hugging Face (or peft) model, not wrapped yet
    config: Any  # its transformers config
    tokenizer: Any
    params: Dict[str, int]  # metrics.count_parameters
    started: float  # time.perf_counter() when _prepare began


def _run(cfg: "LauncherConfig", env: "DistEnv", run_dir: Path) -> int:
    prepared = _prepare(cfg, env, run_dir)
    if cfg.export_only:
        return _export_only(cfg, env, run_dir, prepared)
    return _train(cfg, env, run_dir, prepared)


def _prepare(cfg: "LauncherConfig", env: "DistEnv", run_dir: Path) -> _Prepared:
    """Preflight and fingerprint, the strategy, the tokenizer and the model (with its adapters)."""
    from launcher.train import distributed as D
    from launcher.train import host_heap, setup, strategies
    from launcher.train.metrics import count_parameters
    from launcher.train.modeling import apply_peft, build_model, check_seq_len, hf_config

    _quiet_libraries()
    started = time.perf_counter()
    seed = cfg.train.seed
    D.log(
        f"run {run_dir.name}: {env.world_size} rank(s) via {env.source}, backend {env.backend}, device "
        f"{env.device}, strategy {cfg.strategy.name}, peft {cfg.peft.name}", env=env,
    )
    setup.preflight_and_fingerprint(cfg, env, run_dir)
    host_heap.for_the_load()  # until the strategy has wrapped the model (launcher/train/host_heap.py)
    # Fail early, cheapest checks first: packages for the strategy, then the model's shape against seq_len.
    strategy = strategies.create(cfg.strategy, cfg.train, env)
    with _as_input_error():
        check_seq_len(cfg.train.seq_len, hf_config(cfg.model))
        tokenizer = setup.build_tokenizer(cfg.model, cfg.data, run_dir, env, task=cfg.task)
        config = setup.task_model_config(cfg.task, cfg.data, hf_config(cfg.model, tokenizer), tokenizer)
        with strategy.building() as placement:  # low-memory construction: the strategy says where each rank builds
            model = build_model(cfg.model, config=config, seed=seed, tokenizer=tokenizer, task=cfg.task.name,
                                placement=placement, quantize=cfg.peft.name == "qlora")
            model = apply_peft(model, cfg.peft, seed=seed, gradient_checkpointing=cfg.model.gradient_checkpointing,
                               task=cfg.task.name)
    params = count_parameters(model)
    D.log(
        f"model {type(model).__name__}: {params['total'] / 1e6:.2f}M parameters, "
        f"{params['trainable'] / 1e6:.3f}M trainable", env=env,
    )
    return _Prepared(strategy, model, config, tokenizer, params, started)


def _quiet_libraries() -> None:
    """Silence warnings that are not ours to fix, and per-file progress bars (they make unreadable Slurm logs)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")
    # bitsandbytes (imported by peft when installed) warns at import that an optional CPU kernel package is missing;
    # its plain torch path runs instead.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    hf_logging.disable_progress_bar()


def _open_checkpoints(prepared: _Prepared, cfg: "LauncherConfig", env: "DistEnv", run_dir: Path) -> Any:
    """Wrap the model (the strategy builds its optimizer and scheduler) and open ``<run_dir>/checkpoints``. A LoRA
    run's checkpoints hold the adapters and the base's fingerprint, not the frozen base."""
    from launcher.train import host_heap
    from launcher.train.checkpoint import CheckpointManager, async_enabled
    from launcher.train.frozen_base import base_fingerprint

    train = cfg.train
    base = base_fingerprint(cfg.model, seed=train.seed) if cfg.peft.name != "none" else None
    prepared.strategy.wrap(prepared.model)
    host_heap.for_the_steps(shards_parameters=prepared.strategy.spec.shards >= 3, device_type=env.device.type)
    return CheckpointManager(run_dir / CHECKPOINTS_DIR, env, prepared.strategy, keep_last=train.keep_last,
                             keep_every=train.keep_every, frozen_base=base,
                             async_save=async_enabled(train.async_save, env.device.type))


def _config_identity(cfg: "LauncherConfig") -> Tuple[str, Dict[str, Any]]:
    """(config hash, flattened training config): what a checkpoint records and a resume compares."""
    from launcher.train.checkpoint import config_hash, training_config

    tree = asdict(cfg)
    return config_hash(tree), training_config(tree)


def _resume(manager: Any, cfg: "LauncherConfig") -> Optional[Dict[str, Any]]:
    """THE resume path (training and export): load the newest complete checkpoint after checking that it fits this
    run (strategy, world size; a changed config only warns). Returns its trainer state, or None when there is none."""
    latest = manager.find_latest()
    if latest is None:
        return None
    cfg_hash, cfg_flat = _config_identity(cfg)
    manager.check_compatible(latest, manager.read_state(latest), cfg_hash=cfg_hash, cfg_flat=cfg_flat)
    return manager.load(latest, seed=cfg.train.seed)


def _export(cfg: "LauncherConfig", prepared: _Prepared, run_dir: Path) -> None:
    """Collective: write the Hugging Face export to ``<run_dir>/export`` (rank 0 writes)."""
    from launcher.train.export import export_model

    export_model(prepared.strategy, run_dir / EXPORT_DIR, prepared.tokenizer, peft=cfg.peft,
                 pretrained=cfg.model.pretrained, task=cfg.task.name)


def _export_only(cfg: "LauncherConfig", env: "DistEnv", run_dir: Path, prepared: _Prepared) -> int:
    """``export_only=true``: export the newest checkpoint; nothing is trained."""
    from launcher.train.checkpoint import CheckpointError

    manager = _open_checkpoints(prepared, cfg, env, run_dir)
    if _resume(manager, cfg) is None:
        raise CheckpointError(
            f"export_only=true but {run_dir / CHECKPOINTS_DIR} holds no complete checkpoint to export"
        )
    _export(cfg, prepared, run_dir)
    return EXIT_OK


def _train(cfg: "LauncherConfig", env: "DistEnv", run_dir: Path, prepared: _Prepared) -> int:
    """Data, resume (or a fresh seed), the loop, then the export; EXIT_REQUEUE when a stop signal ended the loop."""
    from launcher.train import distributed as D
    from launcher.train import setup
    from launcher.train.loop import STOPPED
    from launcher.train.metrics import MetricsFile
    from launcher.train.trackers import open_trackers

    train = cfg.train
    with _as_input_error():
        splits = setup.build_datasets(cfg.data, seq_len=train.seq_len, output_dir=cfg.output_dir,
                                      tokenizer=prepared.tokenizer, env=env, seed=train.seed, run_dir=run_dir,
                                      task=cfg.task, labels=setup.labels_of(prepared.config), model=cfg.model)
        sampler = setup.build_sampler(len(splits.train), micro_batch_size=train.micro_batch_size, env=env,
                                      seed=train.seed, grad_accum=train.grad_accum,
                                      sources=getattr(splits, "sources", None))
        cfg = setup.apply_epochs(cfg, len(splits.train), env, prepared.strategy)  # train.epochs -> max_steps
        train = cfg.train
    manager = _open_checkpoints(prepared, cfg, env, run_dir)
    state = _resume_training(manager, sampler, cfg, env)
    trackers = open_trackers(cfg, run_dir, is_main=env.is_main, warn=lambda text: D.log(text, env=env))
    metrics = MetricsFile(run_dir / METRICS_FILE, resume_step=state.step, enabled=env.is_main, sinks=[trackers])
    trainer = _trainer(cfg, env, prepared, splits=splits, sampler=sampler, checkpoints=manager, metrics=metrics,
                       state=state)  # TensorBoard is one of the trackers (metrics.py sends every record)
    D.log(
        f"ready in {time.perf_counter() - prepared.started:.1f}s: {len(splits.train)} train / {len(splits.eval)} "
        f"eval sequences of {splits.train.seq_len} tokens; global batch {trainer.tokens_per_step} tokens; "
        + (f"resuming at step {state.step}" if state.step else "starting at step 0"), env=env,
    )
    _watchdog().start(train, env, run_dir, metrics)  # the hang watchdog and the straggler report
    outcome = None
    try:
        outcome = trainer.train()
    finally:
        _watchdog().stop()
        metrics.close()
        trackers.close(finished=outcome is not None and outcome != STOPPED)
    if outcome == STOPPED:
        D.log(f"stopped at step {state.step} after a checkpoint: exit {EXIT_REQUEUE} (requeue to resume)", env=env)
        return EXIT_REQUEUE
    if train.export:
        _export(cfg, prepared, run_dir)
    D.log(f"done: step {state.step}, {time.perf_counter() - prepared.started:.1f}s", env=env)
    return EXIT_OK


def _resume_training(manager: Any, sampler: Any, cfg: "LauncherConfig", env: "DistEnv") -> Any:
    """The loop's starting state: the checkpoint's (and the sampler's position), else step 0 with a fresh seed.
    Half-written checkpoints of a crashed attempt are removed afterwards."""
    from launcher.train.checkpoint import reseed
    from launcher.train.loop import LoopState

    saved = _resume(manager, cfg)
    if saved is None:
        reseed(cfg.train.seed, env.rank)
        state = LoopState()
    else:
        sampler.load_state_dict(saved["sampler"])
        state = LoopState(step=int(saved["step"]), tokens=int(saved.get("tokens", 0)),
                          elapsed_s=float(saved.get("elapsed_s", 0.0)))
    manager.remove_unfinished()
    return state


def _trainer(cfg: "LauncherConfig", env: "DistEnv", prepared: _Prepared, *, splits: Any, sampler: Any,
             checkpoints: Any, metrics: Any, state: Any) -> Any:
    """The loop, with the FLOPs per token for MFU and what every checkpoint records about the config."""
    from launcher.train.loop import Trainer
    from launcher.train.metrics import flops_per_token

    train, config = cfg.train, prepared.config
    cfg_hash, cfg_flat = _config_identity(cfg)
    fpt = flops_per_token(prepared.params, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                          seq_len=train.seq_len)
    extra = {
        "config_hash": cfg_hash,
        "training_config": cfg_flat,
        "global_batch_sequences": train.micro_batch_size * train.grad_accum * env.world_size,
    }
    return Trainer(
        train=train, device_name=cfg.cluster.device if cfg.cluster else None, env=env, strategy=prepared.strategy,
        splits=splits, sampler=sampler, checkpoints=checkpoints, metrics=metrics, flops_per_token=fpt, state=state,
        trainer_state_extra=extra,
    )
