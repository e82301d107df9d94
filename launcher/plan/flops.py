"""THE FLOPs count: model FLOPs per trained token, for the dry run's budget, the job's MFU and the scaling report.

Stdlib only. The usual estimate (Kaplan et al.; PaLM appendix B), matmuls only, recomputation of gradient
checkpointing not counted:

    forward             2 * N
    backward, inputs    2 * N
    backward, weights   2 * N_trainable        (all of N for full training; only the adapters for LoRA)
    attention           12 * layers * hidden * seq_len   (QK^T and AV, forward + backward, no causal discount)

N: the parameters that take part in matmuls, every parameter except the input embedding table (a lookup) unless it is
tied to the output head, adapters included. Full training gives the familiar ``6N + 12 L H S``. A classifier
(``ModelShape.num_labels``) has a hidden x num_labels head instead of the LM head, its embedding is always a lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from launcher.plan.shape import ModelShape


def flops_per_token(*, matmul_params: int, trainable_matmul_params: int, n_layers: int, hidden_size: int,
                    seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring)."""
    trainable = min(trainable_matmul_params, matmul_params)
    return 4.0 * matmul_params + 2.0 * trainable + 12.0 * n_layers * hidden_size * seq_len


def flops_for_shape(shape: "ModelShape", seq_len: int, lora_params: Optional[int] = None) -> float:
    """The login node's count from the config's numbers; equal to the job's count of the built model."""
    embedding = 0 if shape.embedding_is_matmul else shape.vocab_size * shape.hidden_size
    base = shape.n_params() - embedding
    matmul = base + (lora_params or 0)
    trainable = matmul if lora_params is None else lora_params
    return flops_per_token(matmul_params=matmul, trainable_matmul_params=trainable, n_layers=shape.n_layers,
                           hidden_size=shape.hidden_size, seq_len=seq_len)
