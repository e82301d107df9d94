"""What the job builds before the model: the preflight and fingerprint, tokenizer, datasets, sampler, TensorBoard.

Each helper takes the config sections it reads (``launcher.config.schema``), never the whole tree. Work that rank 0
does alone (training the tokenizer, tokenizing the data) runs under ``distributed.run_together``, so a rank that
fails releases the others instead of leaving them in a barrier.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from launcher.config.schema import DataConfig, LauncherConfig, ModelConfig
from launcher.rundir import SYNC_DIR, TENSORBOARD_DIR, TOKENIZER_DIR
from launcher.train import distributed as D


def preflight_and_fingerprint(cfg: LauncherConfig, env: D.DistEnv, run_dir: Path) -> None:
    """Before building anything: check the allocation (devices, binding, bandwidth) and record the environment.

    Skipped for ``train.preflight=false`` and for export-only runs (nothing is trained on the allocation)."""
    if cfg.train.preflight and not cfg.export_only:
        from launcher.train.preflight import PreflightOptions, run_preflight

        # The first collective also creates NCCL's communicators: slow on hundreds of GPUs and cold nodes.
        run_preflight(cfg.cluster, model=cfg.model, rank=env.rank, local_rank=env.local_rank,
                      world_size=env.world_size, device=env.device,
                      options=PreflightOptions(run_dir=run_dir, timeout_s=300.0 + env.world_size / 8))
    if env.is_main:  # after the preflight: its imports and image hashing must not eat into the others' timeout
        from launcher.scaling.fingerprint import write_fingerprint

        write_fingerprint(run_dir, env.world_size)


def build_tokenizer(model: ModelConfig, data: DataConfig, run_dir: Path, env: D.DistEnv) -> Any:
    """The run's tokenizer: ``model.tokenizer``/``model.pretrained`` loaded by every rank, else a BPE that rank 0
    trains on ``data.path`` into ``<run_dir>/tokenizer`` (kept for the next attempt)."""
    from launcher.train.data_formats import iter_texts
    from launcher.train.tokenizer import load_or_build_tokenizer, tokenizer_source

    save_dir = run_dir / TOKENIZER_DIR
    if tokenizer_source(model) is not None:  # a local directory: every rank loads it, no barrier
        return load_or_build_tokenizer(model, lambda: [], save_dir, is_main=env.is_main, barrier=D.barrier)
    return D.run_together(
        lambda barrier: load_or_build_tokenizer(
            model, lambda: iter_texts(data.path, data.format), save_dir, is_main=env.is_main, barrier=barrier,
        ),
        env.device,
        "building the tokenizer",
        flag_dir=run_dir / SYNC_DIR,
    )


def build_datasets(data: DataConfig, *, seq_len: int, output_dir: str, tokenizer: Any, env: D.DistEnv, seed: int,
                   run_dir: Path) -> Any:
    """The train/eval splits, tokenized once by rank 0 into the shared cache (``data.cache_dir`` or
    ``<output_dir>/.cache/tokenized``) and memory-mapped by every rank."""
    from launcher.train.data import cache_root_for, prepare_datasets

    values = asdict(data)  # launcher.train.data reads the section as a mapping (and hashes its values)
    return D.run_together(
        lambda barrier: prepare_datasets(
            values, tokenizer, seq_len, cache_root_for(values, output_dir),
            seed=seed, is_main=env.is_main, barrier=barrier,
        ),
        env.device,
        "preparing the data",
        flag_dir=run_dir / SYNC_DIR,
    )


def build_sampler(num_samples: int, *, micro_batch_size: int, env: D.DistEnv, seed: int) -> Any:
    """The resumable sampler over ``num_samples`` training sequences, ``micro_batch_size`` per rank."""
    from launcher.train.sampler import ResumableSampler

    return ResumableSampler(num_samples, global_batch_size=micro_batch_size * env.world_size, rank=env.rank,
                            world_size=env.world_size, seed=seed)


def open_tensorboard(enabled: bool, run_dir: Path, env: D.DistEnv) -> Optional[Any]:
    """A SummaryWriter into ``<run_dir>/tensorboard`` on rank 0 when ``train.tensorboard``; None otherwise.

    TensorBoard is optional (not a dependency): without it the run warns and trains on."""
    if not enabled or not env.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        D.log("WARNING: train.tensorboard=true but tensorboard is not installed (pip install tensorboard); skipping")
        return None
    return SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
