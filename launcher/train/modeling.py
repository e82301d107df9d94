"""The model: built from the config's numbers (pretraining from scratch) or loaded from a local directory.

Never a hub call: ``model.pretrained`` must be a local directory (compute nodes are offline). Every rank builds the same
weights: the build runs under ``torch.manual_seed(seed)``, and the strategies broadcast or shard from there.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

# Config section key -> transformers config attribute.
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


def hf_config(model_cfg: Mapping[str, Any], tokenizer: Any = None) -> Any:
    """The transformers config: from ``model.pretrained``'s config.json, else from the numbers in ``model``."""
    from transformers import AutoConfig

    if model_cfg.get("pretrained"):
        path = _local_dir(model_cfg["pretrained"], "model.pretrained")
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    kwargs = {hf: model_cfg[ours] for ours, hf in _CONFIG_KEYS.items() if ours in model_cfg}
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                kwargs[name] = value
    try:
        return AutoConfig.for_model(model_cfg["arch"], **kwargs)
    except (KeyError, ValueError) as e:
        raise ModelInputError(f"model.arch={model_cfg['arch']!r}: transformers cannot build it ({e})") from e


def max_positions(config: Any) -> Optional[int]:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int, config: Any) -> None:
    """``train.seq_len`` must fit the model's position range."""
    limit = max_positions(config)
    try:
        from launcher.train.data import check_seq_len as data_check
    except ImportError:
        data_check = None
    if data_check is not None and limit is not None:
        data_check(seq_len, limit)
        return
    if limit is not None and seq_len > limit:
        raise ModelInputError(
            f"train.seq_len={seq_len} is above the model's max_position_embeddings={limit}; "
            f"use train.seq_len<={limit} (or a model with longer positions)"
        )


def build_model(
    model_cfg: Mapping[str, Any],
    *,
    config: Any,
    seed: int,
    tokenizer: Any = None,
) -> Any:
    """The causal LM in fp32 on CPU (strategies move, cast and shard it), seeded and deterministic."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model_cfg.get("pretrained"):
        path = _local_dir(model_cfg["pretrained"], "model.pretrained")
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tokenizer is not None:
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            if not model_cfg.get("pretrained"):
                raise ModelInputError(
                    f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={vocab}; "
                    f"set model.vocab_size>={len(tokenizer)}"
                )
            model.resize_token_embeddings(len(tokenizer))
    if model_cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def linear_module_names(model: Any) -> List[str]:
    """Distinct last-name components of the model's linear layers (what LoRA target_modules may name)."""
    names = set()
    linear_types = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types.append(Conv1D)
    except ImportError:
        pass
    for full_name, module in model.named_modules():
        if isinstance(module, tuple(linear_types)) and full_name:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(peft_cfg: Mapping[str, Any]) -> Any:
    from peft import LoraConfig

    targets = peft_cfg["target_modules"]
    return LoraConfig(
        r=int(peft_cfg["r"]),
        lora_alpha=int(peft_cfg["alpha"]),
        lora_dropout=float(peft_cfg["dropout"]),
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


def apply_peft(model: Any, peft_cfg: Mapping[str, Any], *, seed: int, gradient_checkpointing: bool = False) -> Any:
    """Wrap in LoRA adapters when ``peft.name == lora``; otherwise return the model as is."""
    if peft_cfg.get("name", "none") == "none":
        return model
    if peft_cfg["name"] != "lora":
        raise ModelInputError(f"peft.name={peft_cfg['name']!r}: only none and lora are supported")
    from peft import get_peft_model

    check_lora_targets(model, list(peft_cfg["target_modules"]))
    torch.manual_seed(seed + 1)  # the adapters' init, the same on every rank
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(peft_cfg))
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


def describe(model: Any) -> Dict[str, Any]:
    from launcher.train.metrics import count_parameters

    counts = count_parameters(model)
    return {"class": type(model).__name__, **counts}


def _local_dir(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ModelInputError(
            f"{key}={value!r}: no such local directory (compute nodes are offline: stage the model on the login "
            "node and give its directory)"
        )
    return path
