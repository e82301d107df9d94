"""fsdp: PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded like ZeRO-3.

- One ``fully_shard`` per decoder layer (the classes in the model's ``_no_split_modules``), then one on the root.
- bf16: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, fp32 sharded master weights.
- ``offload_params`` / ``offload_optimizer`` (GPUs): ``CPUOffloadPolicy`` (parameters, gradients and the optimizer
  step on CPU).
- Gradient accumulation: gradients are reduce-scattered after every micro-batch, so each rank only ever holds its
  shard. Skipping the sync until the last micro-batch (``set_requires_gradient_sync(False)``) would keep unsharded
  fp32 gradients, 4 bytes per parameter on every GPU whatever the world size (+32 GB for Llama-8B), for a saving of
  one reduce-scatter per micro-batch that overlaps with backward anyway (measured in docs/training.md).
- CPU offload on GPUs: the gradient norm is reduced over CPU DTensors, so the process group gets gloo for CPU tensors
  beside NCCL (``needs_cpu_collectives``; see launcher.train.distributed.process_group_backend).
- Checkpoints: torch.distributed.checkpoint, sharded; a different world size reshards on load.
- Export: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` onto rank 0.
FSDP1 is not used: its full-state-dict CPU offload crashes on CPU (see shared/reference/stack-on-cpu.md).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from launcher.config.strategies import needs_cpu_collectives
from launcher.train.strategies import dcp
from launcher.train.strategies.base import build_optimizer_and_scheduler

checkpoint_problem = dcp.checkpoint_problem  # the registry's per-engine check: DCP files


def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The transformer blocks to shard one by one: classes named in Hugging Face's ``_no_split_modules``."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"fsdp: found no decoder layers to shard in {type(model).__name__} (no _no_split_modules); "
            "use strategy=zero3 for this model"
        )
    return layers


class FSDPStrategy(dcp.TorchNativeStrategy):
    """One ``fully_shard`` per decoder layer and one on the root; the mixed-precision policy casts."""

    def wrap(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        kwargs: Dict[str, Any] = {"mesh": mesh}
        if self.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if needs_cpu_collectives(self.strategy_cfg, self.env.device.type):
            kwargs["offload_policy"] = CPUOffloadPolicy()
        # No model.to(device): fully_shard moves each layer's states to the mesh device as it shards them, so the
        # whole unsharded model never sits on one GPU.
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        self.model = model
        self.module = model
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(model, self.train)

    def forward_backward(self, batch: Dict[str, torch.Tensor], *, last: bool) -> torch.Tensor:
        loss = self.model(**batch).loss
        (loss / self.grad_accum).backward()
        return loss.detach().float()

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return dict(state) if self.env.is_main else None
