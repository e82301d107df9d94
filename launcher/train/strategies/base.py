"""The one interface every parallelism backend implements, and the pieces they share.

A strategy owns the wrapped model, the optimizer and the LR scheduler. The loop, the checkpoints and the export call:

    building()                     a context for building the model; yields where and in which dtype (Placement)
    wrap(model)                    shard/replicate the model, build optimizer + scheduler
    forward_backward(batch, last)  one micro-batch (already on the device): forward, loss, backward (scaled for
                                   gradient accumulation); returns the unscaled loss, detached, on the device
    step()                         clip, optimizer step, scheduler step, zero grads; returns the grad norm (a tensor)
    save(dir) / load(dir)          this rank's part of a checkpoint (every rank calls both)
    save_async(dir)                the same in the background where the engine can (a future), else save(dir)
    full_state_dict()              the whole model's weights on rank 0 (a collective; None on other ranks)

Data attributes: ``spec`` (the strategy's row in ``launcher.config.strategies``), ``env``, ``precision`` (fp32 or
bf16), ``model`` (the wrapped model: call it for a forward pass, ``.train()``/``.eval()``), ``module`` (the Hugging
Face or peft model inside it), ``optimizer`` and ``scheduler``. Everything else (evaluation, the learning rate,
checkpoint checks, scheduler state, export) lives with its caller.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import torch

from launcher.config.strategies import StrategySpec, strategy_spec
from launcher.train.distributed import DistEnv
from launcher.train.schedule import build_scheduler

if TYPE_CHECKING:
    from launcher.config.schema import StrategyConfig, TrainConfig
    from launcher.train.modeling import Placement

# AdamW settings shared by every strategy (torch AdamW and DeepSpeedCPUAdam).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


class StrategyUnavailable(RuntimeError):
    """The installed packages cannot run this strategy (names the package and version)."""


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs (CUDA and ROCm), fp32 on CPU."""
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if setting not in ("bf16", "fp32"):
        raise ValueError(f"strategy.precision={setting!r}: use auto, bf16 or fp32")
    return setting


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not on norms, biases); frozen parameters left out."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # ZeRO-3 partitions (built under zero.Init) are flat: their ds_shape is the parameter's real shape.
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (peft settings froze everything?)")
    groups = [{"params": decay, "weight_decay": float(weight_decay)}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, train: "TrainConfig") -> torch.optim.Optimizer:
    """torch AdamW over ``param_groups``: the same groups and settings for every strategy."""
    groups = param_groups(model, train.weight_decay)
    return torch.optim.AdamW(groups, lr=float(train.lr), betas=ADAM_BETAS, eps=ADAM_EPS)


def build_optimizer_and_scheduler(model: torch.nn.Module, train: "TrainConfig") -> Tuple[Any, Any]:
    """AdamW and its warmup-cosine LambdaLR."""
    optimizer = build_optimizer(model, train)
    return optimizer, build_scheduler(optimizer, train)


class Strategy(ABC):
    """wrap, forward_backward, step, save, load, full_state_dict (see the module docstring)."""

    def __init__(self, strategy_cfg: "StrategyConfig", train: "TrainConfig", env: DistEnv) -> None:
        self.spec: StrategySpec = strategy_spec(strategy_cfg.name)
        self.strategy_cfg = strategy_cfg
        self.train = train
        self.env = env
        self.precision = resolve_precision(strategy_cfg.precision, env.device)
        self.grad_accum = int(train.grad_accum)
        self.model: Any = None  # the wrapped model
        self.module: Any = None  # the Hugging Face (or peft) model inside it
        self.optimizer: Any = None
        self.scheduler: Any = None

    @contextlib.contextmanager
    def building(self) -> Iterator["Placement"]:
        """Held while the model (and its adapters) are built; yields where and in which dtype this rank builds it
        (``launcher.train.modeling.build_model(placement=...)``). zero3 adds its DeepSpeed config for transformers."""
        yield self._placement()

    def _placement(self) -> "Placement":
        """Default: straight onto the rank's device in the training precision, no host copy first (zero1/zero2; ddp,
        fsdp and zero3 override it)."""
        from launcher.train.modeling import Placement

        return Placement(dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32, device=self.env.device)

    @abstractmethod
    def wrap(self, model: torch.nn.Module) -> None:
        """Place, wrap or shard ``model``; build the optimizer and the scheduler."""

    @abstractmethod
    def forward_backward(self, batch: Dict[str, torch.Tensor], *, last: bool) -> torch.Tensor:
        """One micro-batch; ``last``: the step's last one (gradients are reduced). Returns the detached loss."""

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Clip, optimizer and scheduler step, zero the gradients; the grad norm before clipping, on the device."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write this rank's part of the model and optimizer under ``directory``, each file fsynced."""

    def save_async(self, directory: Path) -> Optional["Future[Any]"]:
        """Start writing what ``save`` writes, in the background (collective). Returns a future that resolves once
        this rank's files are on disk (on rank 0: every rank's), or None for an engine that saves only
        synchronously: then the files are on disk when it returns."""
        self.save(directory)
        return None

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Read back what ``save`` wrote (model and optimizer)."""

    @abstractmethod
    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """Every weight of ``self.module`` (its own state-dict keys) on CPU on rank 0; None elsewhere. Collective."""
