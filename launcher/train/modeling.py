"""The model: built from the config's numbers (pretraining from scratch) or loaded from a local directory.

Never a hub call: ``model.pretrained`` must be a local directory (compute nodes are offline). Every rank builds the same
weights: the build runs under ``torch.manual_seed(seed)``, and the strategies broadcast or shard from there.
Functions take their schema section (``ModelConfig``, ``PeftConfig``); a plain mapping of a section's values (tests,
tools reading YAML) is merged into it by ``launcher.config.load.section``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, List, Optional

import torch

from launcher.config.load import section
from launcher.config.schema import ModelConfig, PeftConfig
from launcher.train.data_formats import check_seq_len as _check_positions

# ModelConfig field -> transformers config attribute.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
    "rope_theta": "rope_theta",
}


class ModelInputError(ValueError):
    """A model setting that cannot work (names the key and what would)."""


def hf_config(model: ModelConfig, tokenizer: Any = None) -> Any:
    """The transformers config: from ``model.pretrained``'s config.json, else from the numbers in ``model``."""
    from transformers import AutoConfig

    model = section(model, ModelConfig)
    if model.pretrained:
        path = _local_dir(model.pretrained, "model.pretrained")
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    kwargs = {hf: getattr(model, ours) for ours, hf in _CONFIG_KEYS.items()}
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                kwargs[name] = value
    try:
        return AutoConfig.for_model(model.arch, **kwargs)
    except (KeyError, ValueError) as e:
        raise ModelInputError(f"model.arch={model.arch!r}: transformers cannot build it ({e})") from e


def max_positions(config: Any) -> Optional[int]:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int, config: Any) -> None:
    """``train.seq_len`` must fit the transformers config's position range (``ConfigError`` otherwise)."""
    limit = max_positions(config)
    if limit is not None:
        _check_positions(seq_len, limit)


def build_model(model: ModelConfig, *, config: Any, seed: int, tokenizer: Any = None) -> Any:
    """The causal LM in fp32 on CPU (strategies move, cast and shard it), seeded and deterministic."""
    from transformers import AutoModelForCausalLM

    model = section(model, ModelConfig)
    torch.manual_seed(seed)
    if model.pretrained:
        path = _local_dir(model.pretrained, "model.pretrained")
        lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    else:
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tokenizer is not None:
        vocab = lm.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            if not model.pretrained:
                raise ModelInputError(
                    f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={vocab}; "
                    f"set model.vocab_size>={len(tokenizer)}"
                )
            lm.resize_token_embeddings(len(tokenizer))
    if model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    return lm


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def linear_module_names(model: Any) -> List[str]:
    """Distinct last-name components of the model's linear layers (what LoRA target_modules may name)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and full_name:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(peft: PeftConfig) -> Any:
    """peft's ``LoraConfig`` for the ``peft`` section."""
    from peft import LoraConfig

    peft = section(peft, PeftConfig)
    targets = peft.target_modules
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )


def check_lora_targets(model: Any, targets: List[str]) -> None:
    """Fail before training when a target module does not exist (peft's own error comes late and says less)."""
    if list(targets) == ["all-linear"]:
        return
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ModelInputError(
            f"peft.target_modules: {missing} not found in {type(model).__name__}; "
            f"its linear modules are: {', '.join(available)} (or use [all-linear])"
        )


def apply_peft(model: Any, peft: PeftConfig, *, seed: int, gradient_checkpointing: bool = False) -> Any:
    """Wrap in LoRA adapters when ``peft.name == lora``; otherwise return the model as is."""
    peft = section(peft, PeftConfig)
    if peft.name == "none":
        return model
    if peft.name != "lora":
        raise ModelInputError(f"peft.name={peft.name!r}: only none and lora are supported")
    from peft import get_peft_model

    check_lora_targets(model, list(peft.target_modules))
    torch.manual_seed(seed + 1)  # the adapters' init, the same on every rank
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(peft))
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


def _local_dir(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ModelInputError(
            f"{key}={value!r}: no such local directory (compute nodes are offline: stage the model on the login "
            "node and give its directory)"
        )
    return path
