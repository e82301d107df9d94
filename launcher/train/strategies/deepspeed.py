"""zero1 / zero2 / zero3: the DeepSpeed engine with a JSON config generated from ours.

- Precision: bf16 on GPUs, fp32 on CPU (``strategy.precision`` overrides).
- Optimizer: our torch AdamW as a client optimizer (``zero_allow_untested_optimizer``): no JIT build of
  ``fused_adam``/``cpu_adam``; with ``offload_optimizer`` on a GPU, DeepSpeedCPUAdam (the fast path ZeRO-Offload needs).
- Scheduler: ours (warmup + cosine), stepped by the engine at each accumulation boundary.
- Batch: ``train_micro_batch_size_per_gpu`` = train.micro_batch_size,
  ``gradient_accumulation_steps`` = train.grad_accum.
- Checkpoints: ``save_checkpoint``/``load_checkpoint`` under ``<checkpoint>/deepspeed/``, frozen parameters left out.
  ZeRO partitions are per rank: on another world size the resume goes through DeepSpeed's universal checkpoint
  (``launcher.train.strategies.universal``). Saves are synchronous (docs/checkpoints.md says why).
- Model construction (``building``): zero1/zero2 load straight onto the device in the training
  precision; zero3 builds under ``HfDeepSpeedConfig`` + ``deepspeed.zero.Init`` (only rank 0 reads the checkpoint).
- Export: ZeRO-3 gathers the weights layer by layer onto rank 0 (``_zero3_consolidated_16bit_state_dict``, the
  ``stage3_gather_16bit_weights_on_model_save`` path); ZeRO-1/2 hold full weights on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from launcher.config.strategies import strategy_spec
from launcher.train.distributed import DistEnv
from launcher.train.schedule import build_scheduler
from launcher.train.strategies.base import (
    ADAM_BETAS, ADAM_EPS, Strategy, StrategyUnavailable, build_optimizer, param_groups,
)
from launcher.versions import package_version

if TYPE_CHECKING:
    from launcher.config.schema import StrategyConfig, TrainConfig
    from launcher.train.modeling import Placement

TAG = "deepspeed"
# LoRA + zero3 + non-reentrant gradient checkpointing fails before 0.19.3 (transformers #47254, deepspeed PR #8148);
# pyproject's train extra has the same floor (tests/test_gpu_path.py checks that they agree).
MIN_VERSION = (0, 19, 3)


MIN_BUCKET_ELEMENTS = 1 << 20
MIN_UNIT_ELEMENTS = 1 << 23


def bucket_sizes(stage: int, hidden_size: Optional[int]) -> Dict[str, int]:
    """ZeRO's buffer sizes from the model's hidden size h, as Hugging Face's ``"auto"`` fills them: h*h-element
    reduce (and zero1/2 all-gather) buckets, a 0.9*h*h prefetch bucket, parameters under 10*h elements kept whole.
    DeepSpeed's defaults are fixed whatever the model (5e8-element buckets: 1.86 GiB fp32 allocated per rank, filled
    up to the whole model's gradients); {} when h is unknown (DeepSpeed's defaults). zero3 also works in units of
    about a decoder layer (12*h*h) where DeepSpeed's defaults are 1e9 elements, i.e. the whole of most models: the
    optimizer steps sub-groups of that size (its flat gradient copy and Adam's temporaries are a sub-group's, not the
    partition's; element-wise, the same values), and gathered parameters are released within that many live or
    reused elements (with 1e9, all of a model under 1B parameters stays gathered from forward to backward: a full
    replica on every rank, what ZeRO-3 is for avoiding; FSDP reshards after forward the same way)."""
    if not hidden_size:
        return {}
    # Floors keep small models in a few collectives (h = 64: 4096-element buckets would mean an all-reduce every few
    # tensors); from h = 1024 on they do not bind (1M elements: 4 MiB fp32; 8M: under one h = 1024 layer).
    square = int(hidden_size) * int(hidden_size)
    bucket, unit = max(square, MIN_BUCKET_ELEMENTS), max(12 * square, MIN_UNIT_ELEMENTS)
    if stage == 3:
        return {"reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": int(0.9 * bucket),
                "stage3_param_persistence_threshold": 10 * int(hidden_size), "sub_group_size": unit,
                "stage3_max_live_parameters": unit, "stage3_max_reuse_distance": unit}
    return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}


def deepspeed_config(strategy: "StrategyConfig", train: "TrainConfig", *, world_size: int, precision: str,
                     device_type: str, hidden_size: Optional[int] = None) -> Dict[str, Any]:
    """The DeepSpeed JSON config for our strategy and train sections (pure; unit-tested). ``hidden_size``: the
    model's, which sizes the buckets (``bucket_sizes``); None while the model is not built yet (zero.Init)."""
    stage = strategy_spec(strategy.name).zero_stage
    zero: Dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": device_type == "cuda",
                            **bucket_sizes(stage, hidden_size)}
    if strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if strategy.offload_params:
        if stage != 3:
            raise ValueError(f"strategy.offload_params=true needs zero3 (got {strategy.name})")
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    micro, accum = int(train.micro_batch_size), int(train.grad_accum)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # A torch optimizer with CPU offload is allowed (on CPU there is nothing faster to use).
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        # Accumulate (and hold) gradients in fp32 like DDP and FSDP do, not in bf16: the strategies stay comparable
        # and many accumulation steps lose no precision. Reductions keep DeepSpeed's default dtype.
        "data_types": {"grad_accum_dtype": "fp32"},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def parse_version(text: str) -> Tuple[int, ...]:
    """``0.19.3+abc`` -> (0, 19, 3), ``0.20.0rc1`` -> (0, 20, 0): the leading digits of each release part."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group(0)))
    return tuple(parts)


def _version_text(version: Tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def check_available() -> None:
    """Raise StrategyUnavailable unless deepspeed >= MIN_VERSION is installed and imports (the registry calls it)."""
    version = package_version("deepspeed")
    if version is None:
        raise StrategyUnavailable(
            f"strategy=zero1/zero2/zero3 needs deepspeed, which is not installed: pip install "
            f"'deepspeed>={_version_text(MIN_VERSION)}' "
            "(or use strategy=fsdp, which shards like ZeRO-3 with PyTorch alone)"
        )
    if parse_version(version) < MIN_VERSION:
        raise StrategyUnavailable(
            f"strategy=zero* needs deepspeed>={_version_text(MIN_VERSION)}, found {version} (LoRA + zero3 + "
            "gradient checkpointing fails before 0.19.3)"
        )
    try:
        import_deepspeed()
    except Exception as e:  # a broken install (e.g. no compiler for its accelerator probe)
        raise StrategyUnavailable(f"deepspeed {version} is installed but cannot be imported: {e}") from e


def import_deepspeed() -> Any:
    """``import deepspeed`` without the mlflow its autotuner imports whenever mlflow is installed (we never autotune):
    measured here, 1.5 s of the 2.3 s deepspeed takes to import, plus pandas and fastapi in the memory of every rank.
    ``import mlflow`` fails while a ``None`` stands in ``sys.modules`` (deepspeed catches that); the entry is removed
    afterwards, so the mlflow tracker imports the real package. A process that has mlflow already keeps it."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import deepspeed
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def checkpoint_problem(directory: Path) -> Optional[str]:
    """Why ``directory`` holds no loadable DeepSpeed checkpoint (cheap file checks), or None."""
    path = Path(directory) / TAG
    if not path.is_dir():
        return f"{path} is missing"
    if not list(path.glob("*model_states.pt")):
        return f"{path} holds no model states"
    if not list(path.glob("*optim_states.pt")):
        return f"{path} holds no optimizer states"
    return None


class DeepSpeedStrategy(Strategy):
    """The DeepSpeed engine at the spec's ZeRO stage; it casts (bf16) and steps the scheduler itself."""

    _hf_ds_config: Any = None  # zero3, while the model is built (``building``)

    def __init__(self, strategy_cfg: "StrategyConfig", train: "TrainConfig", env: DistEnv) -> None:
        super().__init__(strategy_cfg, train, env)
        self._norm = torch.zeros((), dtype=torch.float32, device=env.device)  # the grad norm, reused every step
        _quiet_deepspeed()

    def _ds_config(self, hidden_size: Optional[int] = None) -> Dict[str, Any]:
        return deepspeed_config(self.strategy_cfg, self.train, world_size=self.env.world_size,
                                precision=self.precision, device_type=self.env.device.type, hidden_size=hidden_size)

    def _placement(self) -> "Placement":
        if self.spec.zero_stage != 3:
            return super()._placement()  # zero1/zero2: straight onto the device in the training precision
        # zero.Init partitions each layer onto the device as it is built; rank 0 reads the weights on the host.
        from launcher.train.modeling import Placement

        return Placement(dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32)

    @contextlib.contextmanager
    def building(self) -> Iterator["Placement"]:
        """zero3: while the model is built, transformers sees our DeepSpeed config (``HfDeepSpeedConfig``), so
        from_pretrained and from_config build under ``deepspeed.zero.Init``: each rank keeps only its partition, and
        only rank 0 reads the checkpoint (the others read shapes). Unset afterwards: models built later (the export's
        clean copy on rank 0) must not be partitioned."""
        if self.spec.zero_stage != 3:
            yield self._placement()
            return
        deepspeed = import_deepspeed()
        from deepspeed.accelerator import get_accelerator
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # zero.Init reads the world size from deepspeed.comm: wrap our process group there first, as initialize does.
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   dist_init_required=False, verbose=False)
        self._hf_ds_config = HfDeepSpeedConfig(self._ds_config())  # transformers keeps a weak reference only
        try:
            yield self._placement()
        finally:
            unset_hf_deepspeed_config()
            self._hf_ds_config = None

    def wrap(self, model: torch.nn.Module) -> None:
        deepspeed = import_deepspeed()

        ds_config = self._ds_config(getattr(getattr(model, "config", None), "hidden_size", None))
        optimizer = self._client_optimizer(model)
        scheduler = build_scheduler(optimizer, self.train)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        if self.spec.zero_stage == 3:
            share_fp32_master(ds_optimizer)
        self.model = engine
        self.module = engine.module
        self.optimizer = ds_optimizer
        self.scheduler = ds_scheduler if ds_scheduler is not None else scheduler

    def _client_optimizer(self, model: torch.nn.Module) -> Any:
        if self.strategy_cfg.offload_optimizer and self.env.device.type == "cuda":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            groups = param_groups(model, self.train.weight_decay)
            return DeepSpeedCPUAdam(groups, lr=float(self.train.lr), betas=ADAM_BETAS, eps=ADAM_EPS, adamw_mode=True)
        return build_optimizer(model, self.train)

    def forward_backward(self, batch: Dict[str, torch.Tensor], *, last: bool) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.model.backward(loss)  # scales by 1 / gradient_accumulation_steps
        if not last:
            self.model.step()  # not a boundary: the engine only counts the micro-step
        return loss.detach().float()

    def step(self) -> torch.Tensor:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            self._norm.copy_(norm.detach(), non_blocking=True)
        else:
            self._norm.fill_(float("nan") if norm is None else float(norm))
        return self._norm

    def save(self, directory: Path) -> None:
        from launcher.train.checkpoint import fsync_file

        with _recording_saves(self.model.checkpoint_engine) as written:
            # Frozen parameters (a LoRA base) stay out: the checkpoint holds the base's fingerprint instead.
            self.model.save_checkpoint(str(directory), tag=TAG, client_state={}, save_latest=False,
                                       exclude_frozen_parameters=True)
        if self.env.is_main:  # rank 0 also copied DeepSpeed's recovery scripts (zero_to_fp32.py) into the directory
            written += [str(p) for p in Path(directory).glob("*.py")]
        for path in written:  # this rank's files only: nobody fsyncs them again
            fsync_file(Path(path))

    def load(self, directory: Path) -> None:
        from launcher.train.strategies import universal

        # Frozen parameters are not in the checkpoint (save): they are the base this run rebuilt.
        strict = all(p.requires_grad for p in self.module.parameters())
        saved = universal.saved_world_size(directory, TAG)
        if saved and saved != self.env.world_size:  # ZeRO partitions of another world size
            universal.load_universal(self.model, Path(directory), TAG, strict=strict, is_main=self.env.is_main,
                                     device=self.env.device)
            return
        path, _ = self.model.load_checkpoint(
            str(directory), tag=TAG, load_module_strict=strict, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}/{TAG}")

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        if self.spec.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
            return dict(state) if self.env.is_main else None
        if not self.env.is_main:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}


def share_fp32_master(optimizer: Any) -> int:
    """ZeRO-3 with weights already in the master dtype on the optimizer's device (fp32 on CPU): make each sub-group's
    master partition the weights' flat partition itself, as DeepSpeed does for autocast, and free the copy. DeepSpeed
    means to (stage3.py ``_create_fp32_partitions``) but compares a torch.device with its device name, a str, which
    is never equal, so it clones: one more fp32 copy of the partition, 4 B/param/world per rank. The step's copy back
    (``_reassign_or_swap_out_partitioned_parameters``) then copies in place; the values are the same either way.
    Returns how many sub-groups now share (0 when offloaded or swapped: those keep their own buffers)."""
    flat16 = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    flat32 = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if flat16 is None or flat32 is None or getattr(optimizer, "offload_optimizer", False):
        return 0
    shared = 0
    for weights, master in zip(flat16, flat32):
        if (weights is None or master is None or weights.dtype != master.dtype or weights.device != master.device
                or weights.shape != master.shape or weights.data_ptr() == master.data_ptr()):
            continue
        master.data = weights.data
        shared += 1
    return shared


@contextlib.contextmanager
def _recording_saves(checkpoint_engine: Any) -> Iterator[List[str]]:
    """While open, ``checkpoint_engine.save`` notes each path it writes: the files of this rank."""
    written: List[str] = []
    save: Callable[..., Any] = checkpoint_engine.save
    overridden = "save" in vars(checkpoint_engine)

    def recording_save(state_dict: Any, path: str) -> Any:
        result = save(state_dict, path)
        written.append(str(path))
        return result

    checkpoint_engine.save = recording_save
    try:
        yield written
    finally:
        if overridden:
            checkpoint_engine.save = save
        else:
            del checkpoint_engine.save  # the class's method again


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every step's internals at INFO and ZeRO-3 warns on every collective: keep Slurm logs readable."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*_all_gather_base.*|.*_reduce_scatter_base.*")
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
