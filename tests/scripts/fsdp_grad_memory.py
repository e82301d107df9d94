"""Most bytes of gradients one FSDP rank holds after any micro-batch of a step (before the optimizer step).

Run under torchrun with 2 processes: ``fsdp_grad_memory.py GRAD_ACCUM OUT_JSON [skip-sync]``; ``skip-sync`` turns off
the reduce-scatter before the last micro-batch (what the strategy did before), to show what the measurement sees. Uses the launcher's FSDPStrategy
on a small Llama built from config, so the measurement covers what training really does.
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.train import distributed as D
from launcher.train.strategies.fsdp import FSDPStrategy


def gradient_bytes(model: torch.nn.Module) -> int:
    """Sharded gradients plus any unsharded gradient FSDP2 keeps between micro-batches (its private state)."""
    total = 0
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        group = get_state()._fsdp_param_group if callable(get_state) else None
        for fsdp_param in group.fsdp_params if group is not None else ():
            grad = fsdp_param.sharded_param.grad
            if grad is not None:
                local = grad.to_local() if hasattr(grad, "to_local") else grad
                total += local.numel() * local.element_size()
            for name in ("unsharded_accumulated_grad",):
                extra = getattr(fsdp_param, name, None)
                if extra is not None:
                    total += extra.numel() * extra.element_size()
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None and unsharded.grad is not None:
                total += unsharded.grad.numel() * unsharded.grad.element_size()
    return total


def main() -> None:
    accum, out = int(sys.argv[1]), sys.argv[2]
    skip_sync = sys.argv[3:] == ["skip-sync"]
    env = D.setup(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    train = SimpleNamespace(grad_accum=accum, lr=1e-3, weight_decay=0.0, grad_clip=1.0, warmup_steps=0,
                            max_steps=10, min_lr_ratio=0.1, schedule="cosine", lr_schedule="cosine")
    strategy_cfg = SimpleNamespace(name="fsdp", precision="fp32", offload_params=False, offload_optimizer=False)
    strategy = FSDPStrategy(strategy_cfg, train, env)
    strategy.wrap(model)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(env.rank))
    started, held = time.perf_counter(), 0
    for micro in range(accum):
        if skip_sync:
            strategy.model.set_requires_gradient_sync(micro == accum - 1)
        strategy.forward_backward({"input_ids": ids, "labels": ids}, last=micro == accum - 1)
        held = max(held, gradient_bytes(strategy.model))
    seconds = time.perf_counter() - started
    if env.is_main:
        with open(out, "w") as handle:
            json.dump({"grad_bytes": held, "n_params": n_params, "world_size": env.world_size,
                       "seconds": seconds}, handle)
    D.teardown()


if __name__ == "__main__":
    main()
