"""``run(run_dir)``: train (or resume, or export) the run whose resolved config is ``<run_dir>/config.yaml``.

Launch commands (each process calls ``run``; see docs/training.md):

    local, N processes:  python -m torch.distributed.run --standalone --nproc_per_node N -m launcher.train RUN_DIR
    one process:         python -m launcher.train RUN_DIR
    Slurm (srun, one task per device): each task calls launcher.train.main.run(RUN_DIR) (launcher/slurm/task.py via submitit)

Exit codes: 0 trained (or already trained) and exported; 2 bad input (config, data, model: the message says which key);
3 a stop signal (SIGTERM/SIGUSR2) or ``request_stop()`` arrived, every rank saved a checkpoint: requeue and run the same
command again to resume; 4 the preflight found the allocation unusable (the message says which rank and why);
anything else (an exception) is a failure.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from launcher.rundir import CONFIG_FILE, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_REQUEUE  # noqa: F401


def load_config(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resolved config (the launcher writes it before starting the job)")
    return OmegaConf.load(path)


def run(run_dir: str | Path) -> int:
    """Train the run in ``run_dir``; returns the process exit code (see the module docstring)."""
    run_dir = Path(run_dir).expanduser().resolve()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        cfg = load_config(run_dir)
    except Exception as e:  # noqa: BLE001
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT

    from launcher.preflight import EXIT_PREFLIGHT, PreflightError
    from launcher.train import distributed as D

    cluster = cfg.cluster if cfg.get("cluster") else None
    # Before the rendezvous: a time-limit or preemption signal during a slow start must only set the flag.
    restore_signals = D.install_signal_handlers()
    D.clear_stop()
    from launcher.train.strategies.fsdp import needs_cpu_collectives

    try:
        # setup() applies it only when the device turns out to be a GPU.
        env = D.setup(cluster, cpu_collectives=needs_cpu_collectives(cfg.strategy, "cuda"))
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
        return EXIT_PREFLIGHT
    except Exception:
        print(f"train: [rank {env.rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        restore_signals()
        D.teardown()


def _input_errors() -> tuple:
    from launcher.errors import ConfigError
    from launcher.train.checkpoint import CheckpointError
    from launcher.train.modeling import ModelInputError
    from launcher.train.strategies.base import StrategyUnavailable

    return (ConfigError, ModelInputError, StrategyUnavailable, CheckpointError, FileNotFoundError, _SetupError)


class _SetupError(ValueError):
    """A ValueError raised while reading inputs (before training starts): bad input, not a bug."""


def _run(cfg: Any, env: Any, run_dir: Path) -> int:
    import warnings

    from launcher.train import distributed as D
    from launcher.train import strategies
    from launcher.train.checkpoint import CheckpointManager, config_hash, reseed, training_config
    from launcher.train.loop import STOPPED, LoopState, Trainer
    from launcher.train.metrics import MetricsFile, count_parameters, flops_per_token
    from launcher.train.modeling import apply_peft, build_model, check_seq_len, hf_config

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file bars make unreadable Slurm logs
    t0 = time.perf_counter()
    plain_cfg = _as_dict(cfg)
    train = cfg.train
    seed = int(train.seed)
    D.log(
        f"run {run_dir.name}: {env.world_size} rank(s) via {env.source}, backend {env.backend}, device "
        f"{env.device}, strategy {cfg.strategy.name}, peft {cfg.peft.name}", env=env,
    )

    _preflight_and_fingerprint(cfg, env, run_dir)
    # Fail early, cheapest checks first: packages for the strategy, then the model's shape against seq_len.
    strategy = strategies.create(cfg, env)
    try:
        model_cfg = plain_cfg["model"]
        config = hf_config(model_cfg)
        check_seq_len(int(train.seq_len), config)
        tokenizer = _tokenizer(cfg, plain_cfg, run_dir, env)
        config = hf_config(model_cfg, tokenizer)
        model = build_model(model_cfg, config=config, seed=seed, tokenizer=tokenizer)
        model = apply_peft(model, plain_cfg["peft"], seed=seed,
                           gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing")))
    except ValueError as e:
        if isinstance(e, _input_errors()):
            raise
        raise _SetupError(str(e)) from e
    params = count_parameters(model)
    D.log(
        f"model {type(model).__name__}: {params['total'] / 1e6:.2f}M parameters, "
        f"{params['trainable'] / 1e6:.3f}M trainable", env=env,
    )

    checkpoints_root = run_dir / "checkpoints"
    if cfg.export_only:
        strategy.wrap(model)
        manager = CheckpointManager(checkpoints_root, env, strategy, keep_last=train.keep_last,
                                    keep_every=train.keep_every)
        latest = manager.find_latest()
        if latest is None:
            from launcher.train.checkpoint import CheckpointError

            raise CheckpointError(f"export_only=true but {checkpoints_root} holds no complete checkpoint to export")
        manager.check_compatible(latest, manager.read_state(latest), cfg_hash=config_hash(plain_cfg),
                                 cfg_flat=training_config(plain_cfg))
        manager.load(latest, seed=seed)
        strategy.export(run_dir / "export", tokenizer)
        return EXIT_OK

    try:
        splits = _datasets(cfg, plain_cfg, tokenizer, env, seed, run_dir)
        sampler = _sampler(splits, cfg, env, seed)
    except ValueError as e:
        if isinstance(e, _input_errors()):
            raise
        raise _SetupError(str(e)) from e

    strategy.wrap(model)
    manager = CheckpointManager(checkpoints_root, env, strategy, keep_last=train.keep_last, keep_every=train.keep_every)
    cfg_hash, cfg_flat = config_hash(plain_cfg), training_config(plain_cfg)
    state = LoopState()
    latest = manager.find_latest()
    if latest is not None:
        saved = manager.read_state(latest)
        manager.check_compatible(latest, saved, cfg_hash=cfg_hash, cfg_flat=cfg_flat)
        saved = manager.load(latest, seed=seed)
        sampler.load_state_dict(saved["sampler"])
        state = LoopState(step=int(saved["step"]), tokens=int(saved.get("tokens", 0)),
                          elapsed_s=float(saved.get("elapsed_s", 0.0)))
    else:
        reseed(seed, env.rank)
    manager.remove_unfinished()

    metrics = MetricsFile(run_dir / "metrics.jsonl", resume_step=state.step, enabled=env.is_main)
    tensorboard = _tensorboard(cfg, run_dir, env)
    fpt = flops_per_token(params, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                          seq_len=int(train.seq_len))
    trainer = Trainer(
        cfg=cfg, env=env, strategy=strategy, splits=splits, sampler=sampler, checkpoints=manager, metrics=metrics,
        flops_per_token=fpt, state=state, tensorboard=tensorboard,
        trainer_state_extra={
            "config_hash": cfg_hash,
            "training_config": cfg_flat,
            "global_batch_sequences": int(train.micro_batch_size) * int(train.grad_accum) * env.world_size,
        },
    )
    D.log(
        f"ready in {time.perf_counter() - t0:.1f}s: {len(splits.train)} train / {len(splits.eval)} eval sequences of "
        f"{splits.train.seq_len} tokens; global batch {trainer.tokens_per_step} tokens; "
        + (f"resuming at step {state.step}" if state.step else "starting at step 0"), env=env,
    )
    try:
        outcome = trainer.train()
    finally:
        metrics.close()
        if tensorboard is not None:
            tensorboard.close()
    if outcome == STOPPED:
        D.log(f"stopped at step {state.step} after a checkpoint: exit {EXIT_REQUEUE} (requeue to resume)", env=env)
        return EXIT_REQUEUE
    if train.get("export", True):
        strategy.export(run_dir / "export", tokenizer)
    D.log(f"done: step {state.step}, {time.perf_counter() - t0:.1f}s", env=env)
    return EXIT_OK


def _preflight_and_fingerprint(cfg: Any, env: Any, run_dir: Path) -> None:
    """Before building anything: check the allocation (devices, binding, bandwidth) and record the environment."""
    from launcher.preflight import preflight_enabled, run_preflight

    if preflight_enabled(cfg) and not cfg.export_only:
        # The first collective also creates NCCL's communicators: slow on hundreds of GPUs and cold nodes.
        run_preflight(cfg, rank=env.rank, local_rank=env.local_rank, world_size=env.world_size, device=env.device,
                      run_dir=run_dir, timeout_s=300.0 + env.world_size / 8)
    if env.is_main:  # after the preflight: its imports and image hashing must not eat into the others' timeout
        from launcher.scaling.fingerprint import write_fingerprint

        write_fingerprint(run_dir, env.world_size)


def _as_dict(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _tokenizer(cfg: Any, plain_cfg: dict, run_dir: Path, env: Any) -> Any:
    from launcher.train import distributed as D
    from launcher.train.data_formats import iter_texts
    from launcher.train.tokenizer import load_or_build_tokenizer, tokenizer_source

    data = plain_cfg["data"]
    if tokenizer_source(plain_cfg["model"]) is not None:  # a local directory: every rank loads it, no barrier
        return load_or_build_tokenizer(plain_cfg["model"], lambda: [], run_dir / "tokenizer", is_main=env.is_main,
                                       barrier=D.barrier)
    return D.run_together(
        lambda barrier: load_or_build_tokenizer(
            plain_cfg["model"],
            lambda: iter_texts(data["path"], data.get("format")),
            run_dir / "tokenizer",
            is_main=env.is_main,
            barrier=barrier,
        ),
        env.device,
        "building the tokenizer",
        flag_dir=run_dir / ".sync",
    )


def _datasets(cfg: Any, plain_cfg: dict, tokenizer: Any, env: Any, seed: int, run_dir: Path) -> Any:
    from launcher.train import distributed as D
    from launcher.train.data import cache_root_for, prepare_datasets

    data = plain_cfg["data"]
    return D.run_together(
        lambda barrier: prepare_datasets(
            data, tokenizer, int(cfg.train.seq_len), cache_root_for(data, plain_cfg["output_dir"]),
            seed=seed, is_main=env.is_main, barrier=barrier,
        ),
        env.device,
        "preparing the data",
        flag_dir=run_dir / ".sync",
    )


def _sampler(splits: Any, cfg: Any, env: Any, seed: int) -> Any:
    from launcher.train.sampler import ResumableSampler

    return ResumableSampler(
        len(splits.train), global_batch_size=int(cfg.train.micro_batch_size) * env.world_size,
        rank=env.rank, world_size=env.world_size, seed=seed,
    )


def _tensorboard(cfg: Any, run_dir: Path, env: Any) -> Optional[Any]:
    if not cfg.train.get("tensorboard", False) or not env.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from launcher.train.distributed import log

        log("WARNING: train.tensorboard=true but tensorboard is not installed (pip install tensorboard); skipping")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
