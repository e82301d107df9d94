"""The shape of a Llama-style decoder: what sizes its parameters, its LoRA adapters and its activations.

Imported on the login node: stdlib only. ``launcher.plan.memory`` re-exports ``ModelShape`` and ``LORA_TARGETS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

# Module names LoRA can target in a Llama layer (peft's target_modules).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The numbers that size a Llama-style decoder (RMSNorm, GQA attention with RoPE, SwiGLU MLP, no biases)."""

    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // n_heads, as in LlamaConfig
    # task=classification: a hidden x num_labels head (AutoModelForSequenceClassification's score) replaces the LM
    # head; None: a causal LM.
    num_labels: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.n_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by n_heads ({self.n_heads}); pass head_dim"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        """From the launcher's ``ModelConfig`` (num_layers, num_heads, ...) or a transformers ``LlamaConfig``.

        Duck-typed on attribute names so neither omegaconf nor transformers is imported here.
        """

        def pick(*names: str, default: Any = None) -> Any:
            for name in names:
                value = getattr(cfg, name, None)
                if value is not None:
                    return value
            if default is not None:
                return default
            raise ValueError(f"config has none of {names}")

        return cls(
            n_layers=pick("num_layers", "num_hidden_layers"),
            hidden_size=pick("hidden_size"),
            n_heads=pick("num_heads", "num_attention_heads"),
            n_kv_heads=pick("num_kv_heads", "num_key_value_heads", "num_heads", "num_attention_heads"),
            intermediate_size=pick("intermediate_size"),
            vocab_size=pick("vocab_size"),
            tie_embeddings=bool(pick("tie_embeddings", "tie_word_embeddings", default=False)),
            head_dim=getattr(cfg, "head_dim", None),
        )

    @property
    def q_dim(self) -> int:
        """Width of the query (and attention output) projection: n_heads * head_dim."""
        return self.n_heads * (self.head_dim or self.hidden_size // self.n_heads)

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projections: n_kv_heads * head_dim (smaller with GQA)."""
        return self.n_kv_heads * (self.head_dim or self.hidden_size // self.n_heads)

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q/k/v/o, gate/up/down, two RMSNorm weights."""
        h = self.hidden_size
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h

    def n_params(self) -> int:
        """All parameters, counting a tied embedding / lm_head matrix once (as ``model.parameters()`` does)."""
        embeddings = self.vocab_size * self.hidden_size
        return embeddings + self.n_layers * self.layer_params() + self.hidden_size + self.head_params()

    def head_params(self) -> int:
        """The output head: the LM head (none of its own when tied), or a classifier's hidden x num_labels."""
        if self.num_labels is not None:
            return self.hidden_size * self.num_labels
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def embedding_is_matmul(self) -> bool:
        """The input embedding takes part in a matmul only as a tied LM head (else it is a lookup)."""
        return self.tie_embeddings and self.num_labels is None

    def largest_layer_params(self) -> int:
        """Parameters of the largest single module (DeepSpeed's "largest layer"): ZeRO-3 gathers it whole."""
        h = self.hidden_size
        return max(self.vocab_size * h, h * self.intermediate_size, h * self.q_dim)

    def lora_params(self, r: int, target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> int:
        """Trainable parameters of LoRA adapters of rank ``r`` (A: in x r, B: r x out) on every layer."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        unknown = sorted(set(target_modules) - set(shapes))
        if unknown:
            raise ValueError(f"unknown LoRA target modules {unknown}; allowed: {', '.join(LORA_TARGETS)}")
        return self.n_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in target_modules)
