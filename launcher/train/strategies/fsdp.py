"""fsdp: PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded like ZeRO-3.

- One ``fully_shard`` per decoder layer (the classes in the model's ``_no_split_modules``), one each on untied input and
  output embeddings (``untied_embeddings``), then one on the root.
- bf16: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, fp32 sharded master weights.
- ``offload_params`` / ``offload_optimizer`` (GPUs): ``CPUOffloadPolicy`` (parameters, gradients and the optimizer
  step on CPU).
- Gradient accumulation: gradients are reduce-scattered after every micro-batch, so each rank only ever holds its
  shard. Skipping the sync until the last micro-batch (``set_requires_gradient_sync(False)``) would keep unsharded
  fp32 gradients, 4 bytes per parameter on every GPU whatever the world size (+32 GB for Llama-8B), for a saving of
  one reduce-scatter per micro-batch that overlaps with backward anyway (measured in docs/training.md).
- CPU offload on GPUs: the gradient norm is reduced over CPU DTensors, so the process group gets gloo for CPU tensors
  beside NCCL (``needs_cpu_collectives``; see launcher.train.distributed.process_group_backend).
- Low-memory construction (``building``/``_placement``): rank 0 alone reads (or initializes) the full weights, on the
  host, in the training precision; the other ranks build shapes on the meta device. ``wrap`` turns every parameter
  into an empty one (trainable: fp32 master; frozen: the compute dtype, see ``shard_dtypes``), shards the shapes, and
  ``load_full_weights`` sends rank 0's values into every rank's shards (``set_model_state_dict(...,
  broadcast_from_rank0=True)``), a chunk of tensors at a time cast to the shard's dtype and freed once sent: rank 0
  holds at most the weights as read plus one chunk (256 MiB), the others only their shards.
- Checkpoints: torch.distributed.checkpoint, sharded; a different world size reshards on load.
- Export: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` onto rank 0.
FSDP1 is not used: its full-state-dict CPU offload crashes on CPU (see shared/reference/stack-on-cpu.md).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from launcher.config.strategies import needs_cpu_collectives
from launcher.train.modeling import Placement
from launcher.train.strategies import dcp
from launcher.train.strategies.base import build_optimizer_and_scheduler

checkpoint_problem = dcp.checkpoint_problem  # the registry's per-engine check: DCP files

SHARD_DTYPE = torch.float32  # sharded master weights (bf16 compute comes from the mixed-precision policy)
CHUNK_BYTES = 256 << 20  # rank 0 casts and broadcasts this much fp32 at a time: its peak is the full copy plus
# about one chunk's shards (1 GiB chunks held a whole 250M model's shards beside its full copy)


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


def untied_embeddings(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The input and output embeddings as units of their own where they share no weight (as torchtitan shards them):
    in the root's unit they would stay gathered from forward to backward (FSDP2 does not reshard the root after
    forward), 2 x vocab x h fp32 per rank, the size of several decoder layers. Tied ones stay in the root's unit."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inputs, outputs = (get_in() if get_in else None), (get_out() if get_out else None)
    if inputs is None or outputs is None or inputs.weight is outputs.weight:
        return []
    return [inputs, outputs]


def shard_dtypes(precision: str) -> Tuple[torch.dtype, torch.dtype]:
    """(trainable, frozen) shard dtypes. Trainable parameters keep fp32 master shards; frozen ones (the base under
    LoRA) are never stepped, so they are sharded in the dtype they compute in: under bf16 the mixed-precision policy
    would cast them to bf16 for every all-gather anyway, and fp32 shards would double the frozen base on every rank
    (70B LoRA: 280 GB of shards instead of 140). FSDP2 asks a uniform dtype of the trainable parameters only."""
    return SHARD_DTYPE, torch.bfloat16 if precision == "bf16" else torch.float32


def params_to_meta(model: torch.nn.Module, dtype: torch.dtype, frozen_dtype: Optional[torch.dtype] = None) -> None:
    """Replace every parameter by an empty one (shape and ``requires_grad`` only) of ``dtype`` (``frozen_dtype`` for
    those that do not require gradients, if given); tied ones stay tied."""
    empty: Dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in empty:
                kept = dtype if param.requires_grad or frozen_dtype is None else frozen_dtype
                meta = torch.empty_like(param, device="meta", dtype=kept)
                empty[id(param)] = torch.nn.Parameter(meta, requires_grad=param.requires_grad)
            module._parameters[name] = empty[id(param)]


def _chunks(full: Dict[str, torch.Tensor], limit: int) -> List[List[str]]:
    chunks: List[List[str]] = [[]]
    size = 0
    for key, value in full.items():
        if chunks[-1] and size + value.numel() * 4 > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(key)
        size += value.numel() * 4
    return chunks


def load_full_weights(model: torch.nn.Module, full: Optional[Dict[str, torch.Tensor]], *, cpu_offload: bool = False,
                      chunk_bytes: int = CHUNK_BYTES) -> None:
    """Collective: rank 0's full state dict (``full``; None elsewhere) into the shards of the sharded ``model``, each
    value cast to its shard's dtype. ``full`` is emptied chunk by chunk: rank 0 frees what it has sent, so its shards
    replace the full copy."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    shard_dtype = {k: v.dtype for k, v in model.state_dict().items()} if full is not None else {}
    keys = [_chunks(full, chunk_bytes) if full is not None else None]
    dist.broadcast_object_list(keys, src=0)  # every rank makes the same number of calls
    # strict=False: each call carries one chunk; the check below covers the whole model.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=cpu_offload, strict=False)
    for chunk in keys[0]:
        part = {} if full is None else {
            k: full[k].to(shard_dtype.get(k, SHARD_DTYPE)) if full[k].is_floating_point() else full[k] for k in chunk
        }
        set_model_state_dict(model, part, options=options)
        del part
        for k in chunk if full is not None else ():
            del full[k]
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise RuntimeError(f"fsdp: rank 0 sent no weights for {missing[:5]} ({len(missing)} parameters)")


class FSDPStrategy(dcp.TorchNativeStrategy):
    """One ``fully_shard`` per decoder layer and one on the root; the mixed-precision policy casts."""


    def _placement(self) -> Placement:
        if not self.env.is_main:
            return Placement(dtype=SHARD_DTYPE, device=torch.device("meta"))
        # The one full copy: on the host (a whole large model fits no single GPU), in the training precision.
        return Placement(dtype=torch.bfloat16 if self.precision == "bf16" else torch.float32)

    def wrap(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        kwargs: Dict[str, Any] = {"mesh": mesh}
        if self.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if needs_cpu_collectives(self.strategy_cfg, self.env.device.type):
            kwargs["offload_policy"] = CPUOffloadPolicy()
        # Rank 0's weights as read; then every rank shards shapes only and receives its shards from rank 0.
        full = dict(model.state_dict()) if self.env.is_main else None
        params_to_meta(model, *shard_dtypes(self.precision))
        for layer in decoder_layers(model) + untied_embeddings(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        load_full_weights(model, full, cpu_offload="offload_policy" in kwargs)  # empties ``full``
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
