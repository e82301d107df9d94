"""ddp: torch DistributedDataParallel; every rank holds the whole model and optimizer. Checkpoints via DCP."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from launcher.train.strategies import dcp
from launcher.train.strategies.base import move_batch


class DDPStrategy(dcp.TorchNativeStrategy):
    name = "ddp"

    def wrap(self, model: torch.nn.Module) -> None:
        model.to(self.env.device)
        self.module = model
        # Gradients are views into DDP's all-reduce buckets: no second fp32 copy of every gradient (4 B/param).
        kwargs: Dict[str, Any] = {"gradient_as_bucket_view": True}
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

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        if not self.env.is_main:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

