"""What the job builds before the model: the preflight and fingerprint, tokenizer, datasets, sampler (trackers:
``launcher.train.trackers``).

Each helper takes the config sections it reads (``launcher.config.schema``), never the whole tree. Work that rank 0
does alone (training the tokenizer, tokenizing the data) runs under ``distributed.run_together``, so a rank that
fails releases the others instead of leaving them in a barrier.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

from launcher.config.schema import DataConfig, LauncherConfig, ModelConfig, TaskConfig
from launcher.rundir import SYNC_DIR, TOKENIZER_DIR
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


def build_tokenizer(model: ModelConfig, data: DataConfig, run_dir: Path, env: D.DistEnv,
                    task: Optional[TaskConfig] = None) -> Any:
    """The run's tokenizer: ``model.tokenizer``/``model.pretrained`` loaded by every rank, else a BPE that rank 0
    trains on ``data.path`` (its texts only, for classification) into ``<run_dir>/tokenizer`` (kept for the next
    attempt)."""
    from launcher.train.data_formats import iter_texts
    from launcher.train.tokenizer import load_or_build_tokenizer, tokenizer_source

    def texts() -> Iterator[str]:
        if _is_classification(task):
            from launcher.train.labelled_data import iter_labelled

            return (text for text, _ in iter_labelled(data.path, task.text_field, task.label_field))
        from launcher.train.data_cache import sources_of  # data.sources: the tokenizer learns every source

        return (text for path, _ in sources_of(data) for text in iter_texts(path, data.format))

    save_dir = run_dir / TOKENIZER_DIR
    if tokenizer_source(model) is not None:  # a local directory: every rank loads it, no barrier
        return load_or_build_tokenizer(model, lambda: [], save_dir, is_main=env.is_main, barrier=D.barrier)
    return D.run_together(
        lambda barrier: load_or_build_tokenizer(
            model, texts, save_dir, is_main=env.is_main, barrier=barrier,
        ),
        env.device,
        "building the tokenizer",
        flag_dir=run_dir / SYNC_DIR,
    )


def build_datasets(data: DataConfig, *, seq_len: int, output_dir: str, tokenizer: Any, env: D.DistEnv, seed: int,
                   run_dir: Path, task: Optional[TaskConfig] = None, labels: Optional[list] = None,
                   model: Optional[ModelConfig] = None) -> Any:
    """The train/eval splits, tokenized once by rank 0 into the shared cache (``data.cache_dir`` or
    ``<output_dir>/.cache/tokenized``) and memory-mapped by every rank. Classification: every rank reads the
    labelled file itself (``launcher.train.classification``), with the model's ``labels``."""
    if _is_classification(task):
        from launcher.train.classification import prepare_splits

        return prepare_splits(data, task, tokenizer, seq_len, seed=seed, labels=labels)
    from launcher.train.data import cache_root_for, prepare_datasets
    from launcher.train.data_cache import run_tokenizer_identity

    values = asdict(data)  # launcher.train.data reads the section as a mapping (and hashes its values)
    # The tokenizer's identity as the login node computes it: python -m launcher.prepare fills the same cache.
    ident = run_tokenizer_identity(model, data) if model is not None else None
    return D.run_together(
        lambda barrier: prepare_datasets(
            values, tokenizer, seq_len, cache_root_for(values, output_dir),
            seed=seed, is_main=env.is_main, barrier=barrier, tokenizer_id=ident,
            emit=lambda text: D.log(text, env=env),
        ),
        env.device,
        "preparing the data",
        flag_dir=run_dir / SYNC_DIR,
    )


def _is_classification(task: Optional[TaskConfig]) -> bool:
    return task is not None and task.name == "classification"


def task_model_config(task: TaskConfig, data: DataConfig, config: Any, tokenizer: Any) -> Any:
    """The transformers config for ``task``: classification adds the data's label set and the pad token id."""
    if not _is_classification(task):
        return config
    from launcher.train.classification import configure, read_labels

    return configure(config, read_labels(data, task), tokenizer)


def labels_of(config: Any) -> Optional[list]:
    """The class names of a classification config (id order); None for a causal LM."""
    if getattr(config, "problem_type", None) != "single_label_classification":
        return None
    return [config.id2label[i] for i in range(config.num_labels)]


def build_sampler(num_samples: int, *, micro_batch_size: int, env: D.DistEnv, seed: int, grad_accum: int = 1,
                  sources: Optional[list] = None) -> Any:
    """The resumable sampler over ``num_samples`` training sequences, ``micro_batch_size`` per rank; for a mixture
    (``sources``: DatasetSplits.sources) the sampler that draws each sample's source by weight."""
    from launcher.train.sampler import MixtureSampler, ResumableSampler

    if sources:
        return MixtureSampler([s["rows"] for s in sources], [s["weight"] for s in sources],
                              global_batch_size=micro_batch_size * env.world_size, rank=env.rank,
                              world_size=env.world_size, seed=seed)
    return ResumableSampler(num_samples, global_batch_size=micro_batch_size * env.world_size, rank=env.rank,
                            world_size=env.world_size, seed=seed, grad_accum=grad_accum)


def apply_epochs(cfg: LauncherConfig, num_samples: int, env: D.DistEnv, strategy: Any) -> LauncherConfig:
    """``train.epochs``: the config with ``max_steps`` = epochs x optimizer steps per pass over the train split (the
    strategy's copy too: its scheduler is built from it); unchanged without epochs."""
    from dataclasses import replace

    from launcher.train.sampler import steps_per_epoch

    train = cfg.train
    if train.epochs is None:
        return cfg
    per_epoch = steps_per_epoch(num_samples, micro_batch_size=train.micro_batch_size, world_size=env.world_size,
                                grad_accum=train.grad_accum)
    if per_epoch < 1:
        raise ValueError(f"train.epochs={train.epochs}: the train split has {num_samples} sequences, fewer than one "
                         f"optimizer step of {train.micro_batch_size * train.grad_accum * env.world_size}")
    train = replace(train, max_steps=train.epochs * per_epoch)
    strategy.train = train
    D.log(f"train.epochs={train.epochs}: {per_epoch} steps per epoch, max_steps={train.max_steps}", env=env)
    return replace(cfg, train=train)
