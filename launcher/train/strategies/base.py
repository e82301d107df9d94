"""The one interface every parallelism backend implements, and the pieces they share.

A strategy owns the wrapped model, the optimizer and the LR scheduler. The loop only calls:

    wrap(model)                    shard/replicate the model, build optimizer + scheduler
    forward_backward(batch, last)  one micro-batch: forward, loss, backward (scaled for gradient accumulation);
                                   returns the unscaled loss, detached, still on the device (no host sync)
    step()                         clip, optimizer step, scheduler step, zero grads; returns the grad norm (a tensor)
    eval_loss(batch)               forward only
    save(dir) / load(dir)          this rank's part of a checkpoint (every rank calls both)
    full_state_dict()              the whole model's weights on rank 0 (a collective; None on other ranks)
    export(dir, tokenizer)         Hugging Face directory written by rank 0 (see launcher.train.export)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, Optional, Tuple

import torch

from launcher.train.distributed import DistEnv
from launcher.train.schedule import build_scheduler


class StrategyUnavailable(RuntimeError):
    """The installed packages cannot run this strategy (names the package and version)."""


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_version_tuple() -> Tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs (CUDA and ROCm), fp32 on CPU."""
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if setting not in ("bf16", "fp32"):
        raise ValueError(f"strategy.precision={setting!r}: use auto, bf16 or fp32")
    return setting


def build_optimizer(model: torch.nn.Module, train: Any) -> torch.optim.Optimizer:
    """torch AdamW; weight decay on matrices only (not on norms, biases). Same groups for every strategy."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (peft settings froze everything?)")
    groups = [{"params": decay, "weight_decay": float(train.weight_decay)}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=float(train.lr), betas=(0.9, 0.95), eps=1e-8)


def move_batch(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Strategy(ABC):
    name: ClassVar[str]

    def __init__(self, cfg: Any, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        self.train_cfg = cfg.train
        self.precision = resolve_precision(cfg.strategy.precision, env.device)
        self.grad_accum = int(cfg.train.grad_accum)
        self.model: Any = None  # the wrapped model
        self.module: Any = None  # the Hugging Face (or peft) model inside it
        self.optimizer: Any = None
        self.scheduler: Any = None

    # -- availability ------------------------------------------------------------------------------------------
    @classmethod
    def check_available(cls) -> None:
        """Raise StrategyUnavailable when the installed packages cannot run this strategy."""

    # -- training ----------------------------------------------------------------------------------------------
    @abstractmethod
    def wrap(self, model: torch.nn.Module) -> None: ...

    @abstractmethod
    def forward_backward(self, batch: Dict[str, torch.Tensor], *, last: bool) -> torch.Tensor: ...

    @abstractmethod
    def step(self) -> torch.Tensor: ...

    @torch.no_grad()
    def eval_loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return self.model(**move_batch(batch, self.env.device)).loss.detach().float()

    def train_mode(self) -> None:
        self.model.train()

    def eval_mode(self) -> None:
        self.model.eval()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _build_optimizer_and_scheduler(self, model: torch.nn.Module) -> None:
        self.optimizer = build_optimizer(model, self.train_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.train_cfg)

    # -- checkpoints -------------------------------------------------------------------------------------------
    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @abstractmethod
    def load(self, directory: Path) -> None: ...

    def checkpoint_problem(self, directory: Path) -> Optional[str]:
        """Why ``directory`` cannot be loaded by this strategy (cheap file checks), or None."""
        return None

    def state_for_checkpoint(self) -> Dict[str, Any]:
        """Small JSON-able state kept in trainer_state.json (the scheduler's)."""
        return {"scheduler": _jsonable(self.scheduler.state_dict())}

    def load_state_for_checkpoint(self, state: Dict[str, Any]) -> None:
        """Restore the scheduler's position; its shape (warmup, max_steps, min_lr_ratio) comes from this run's config,
        so raising train.max_steps on resume stretches the cosine from the resumed step on."""
        if "scheduler" not in state:
            return
        saved = dict(state["scheduler"])
        saved["lr_lambdas"] = [dict(vars(f)) if hasattr(f, "__dict__") else None for f in self.scheduler.lr_lambdas]
        self.scheduler.load_state_dict(saved)
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(step)  # what LambdaLR computes; unchanged when the schedule is unchanged
        self.scheduler._last_lr = [group["lr"] for group in self.scheduler.optimizer.param_groups]

    # -- export ------------------------------------------------------------------------------------------------
    @abstractmethod
    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """Every weight of ``self.module`` (its own state-dict keys) on CPU on rank 0; None elsewhere. Collective."""

    def export(self, directory: Path, tokenizer: Any) -> None:
        from launcher.train.export import export_model

        export_model(self, Path(directory), tokenizer)

    @property
    def export_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def named_trainable(self) -> Iterator[Tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.module.named_parameters() if p.requires_grad)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)
