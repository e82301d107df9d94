"""ddp: torch DistributedDataParallel; every rank holds the whole model and optimizer. Checkpoints via DCP."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from launcher.train.strategies import dcp
from launcher.train.strategies.base import Strategy, move_batch


class DDPStrategy(Strategy):
    name = "ddp"
    supports_resharding = True  # replicated state: DCP loads it on any world size

    def wrap(self, model: torch.nn.Module) -> None:
        model.to(self.env.device)
        self.module = model
        kwargs: Dict[str, Any] = {}
        if self.env.device.type == "cuda":
            kwargs["device_ids"] = [self.env.device.index]
        self.model = DistributedDataParallel(model, **kwargs)
        self._build_optimizer_and_scheduler(self.model)

    def forward_backward(self, batch: Dict[str, torch.Tensor], *, last: bool) -> torch.Tensor:
        sync = self.model.no_sync() if not last else contextlib.nullcontext()
        with sync:
            with self.autocast():
                loss = self.model(**move_batch(batch, self.env.device)).loss
            (loss / self.grad_accum).backward()
        return loss.detach()

    def step(self) -> torch.Tensor:
        clip = float(self.train_cfg.grad_clip)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def save(self, directory: Path) -> None:
        dcp.save(self.model, self.optimizer, directory)

    def load(self, directory: Path) -> None:
        dcp.load(self.model, self.optimizer, directory)

    def checkpoint_problem(self, directory: Path) -> Optional[str]:
        return dcp.problem(directory)

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        if not self.env.is_main:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

