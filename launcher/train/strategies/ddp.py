"""ddp: torch DistributedDataParallel; every rank holds the whole model and optimizer. Checkpoints via DCP.

bf16 is ``torch.autocast`` around the model's forward (fp32 weights, gradients and optimizer): the one strategy that
casts by autocast, so it sits inside the model, and training and evaluation forwards both get it. Each rank loads or
builds the model straight onto its device in fp32 (``placement``): no host copy first.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from launcher.train.modeling import Placement
from launcher.train.strategies import dcp
from launcher.train.strategies.base import build_optimizer_and_scheduler

checkpoint_problem = dcp.checkpoint_problem  # the registry's per-engine check: DCP files


def _no_forward_buffer_sync() -> Dict[str, bool]:
    """DDP's option to skip the buffer broadcast before every forward (a collective per micro-batch): a causal LM's
    buffers (rotary tables) are constants computed from the model config, so equal on every rank. torch 2.13 renamed
    the option (``broadcast_buffers`` warns there)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


NO_FORWARD_BUFFER_SYNC = _no_forward_buffer_sync()


def autocast_forward(forward: Callable[..., Any], device_type: str) -> Callable[..., Any]:
    """``forward`` run under bf16 autocast (a fresh context per call)."""

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    return run


class DDPStrategy(dcp.TorchNativeStrategy):
    """Replicated model; gradients all-reduced once per step (``no_sync`` on the other micro-batches)."""

    def _placement(self) -> Placement:
        # Straight onto the device in fp32, the dtype DDP keeps its weights in whatever the precision (autocast).
        return Placement(dtype=torch.float32, device=self.env.device)

    def wrap(self, model: torch.nn.Module) -> None:
        model.to(self.env.device)
        if self.precision == "bf16":
            model.forward = autocast_forward(model.forward, self.env.device.type)  # type: ignore[method-assign]
        self.module = model
        # Gradients are views into DDP's all-reduce buckets: no second fp32 copy of every gradient (4 B/param).
        kwargs: Dict[str, Any] = {"gradient_as_bucket_view": True, **NO_FORWARD_BUFFER_SYNC}
        if self.env.device.type == "cuda":
            kwargs["device_ids"] = [self.env.device.index]
        self.model = DistributedDataParallel(model, **kwargs)
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(self.model, self.train)

    def forward_backward(self, batch: Dict[str, torch.Tensor], *, last: bool) -> torch.Tensor:
        with contextlib.nullcontext() if last else self.model.no_sync():
            loss = self.model(**batch).loss
            (loss / self.grad_accum).backward()
        return loss.detach()

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        if not self.env.is_main:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
