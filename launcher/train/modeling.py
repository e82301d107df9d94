"""The model: built from the config's numbers (pretraining from scratch) or loaded from a local directory.

Never a hub call: ``model.pretrained`` must be a local directory (compute nodes are offline). The build runs under
``torch.manual_seed(seed)``, so every rank that builds real weights builds the same ones. Where and in which dtype is
the strategy's ``Placement`` (docs/memory-planner.md, "Low-memory loading"): replicated strategies load straight onto
their device in the dtype they train in; fsdp reads the full weights on rank 0 alone and the other ranks build shapes
on the meta device; zero3 builds under ``deepspeed.zero.Init``, each rank holding its partition, rank 0 reading.
Functions take their schema section (``ModelConfig``, ``PeftConfig``); a plain mapping of a section's values (tests,
tools reading YAML) is merged into it by ``launcher.config.load.section``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

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


def model_class(task: str = "causal_lm") -> Any:
    """The transformers auto class of ``task.name``: the job builds, the export writes and the tools load with it."""
    import transformers

    classes = {"causal_lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification"}
    if task not in classes:
        raise ModelInputError(f"task.name={task!r}: one of {', '.join(classes)}")
    return getattr(transformers, classes[task])


@dataclass(frozen=True)
class Placement:
    """Where this rank builds the model and in which dtype; the strategy decides (``Strategy.building()`` yields it).

    ``device``: the rank's device for replicated strategies (loaded straight there, no host copy first); ``cpu`` for
    the rank that reads the full weights of a sharded strategy (fsdp's rank 0; zero3's zero.Init partitions as it
    builds); ``meta`` for the ranks that get only shapes here and their shards from rank 0 in ``Strategy.wrap``.
    """

    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @property
    def empty(self) -> bool:
        return self.device.type == "meta"


def build_model(model: ModelConfig, *, config: Any, seed: int, tokenizer: Any = None, task: str = "causal_lm",
                placement: Placement = Placement(), quantize: bool = False) -> Any:
    """The model of ``task`` (a causal LM by default), seeded and deterministic, built where ``placement`` says (by
    default fp32 on CPU). A pretrained model gets ``config`` (a classification head's labels; the head is new)."""
    model = section(model, ModelConfig)
    torch.manual_seed(seed)
    lm = _instantiate(model_class(task), model, config, placement, task, quantize)
    if tokenizer is not None:
        weight = lm.get_input_embeddings().weight
        vocab = getattr(weight, "ds_shape", weight.shape)[0]  # a zero.Init partition is flat: its real shape
        if len(tokenizer) > vocab:
            if not model.pretrained:
                raise ModelInputError(
                    f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={vocab}; "
                    f"set model.vocab_size>={len(tokenizer)}"
                )
            # Shapes only on meta ranks (rank 0 sends the values): no mean of the old rows to compute there.
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=not placement.empty)
    if model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    return lm


def _instantiate(auto: Any, model: ModelConfig, config: Any, placement: Placement, task: str,
                 quantize: bool = False) -> Any:
    """The bare model: shapes only (meta), read from ``model.pretrained``, or initialized from ``config``."""
    if placement.empty:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # real buffers (rotary tables): no state dict carries them
            return auto.from_config(config, dtype=placement.dtype)
    on_device = placement.device.type != "cpu"  # straight to the device: transformers reads tensor by tensor
    if model.pretrained:
        path = _local_dir(model.pretrained, "model.pretrained")
        extra: Dict[str, Any] = {"config": config, "ignore_mismatched_sizes": True} if task != "causal_lm" else {}
        if on_device:
            extra["device_map"] = {"": placement.device}
        if quantize:  # QLoRA (peft=qlora): bitsandbytes quantizes each linear weight as it loads
            extra.update(quantization_config=qlora_quantization_config(), device_map={"": placement.device})
        return auto.from_pretrained(str(path), local_files_only=True, dtype=placement.dtype, **extra)
    if quantize:
        raise ModelInputError("peft.name='qlora' needs model.pretrained: a random base in 4 bits learns nothing")
    return _initialized(auto, config, placement, on_device)


def _initialized(auto: Any, config: Any, placement: Placement, on_device: bool) -> Any:
    """From the config, the way zero3's zero.Init build initializes (transformers' ``initialize_weights_zero3``):
    no constructor init (it would draw random numbers only to be overwritten), then ``_init_weights`` module by module,
    so that every strategy starts from the same weights under the same seed."""
    from transformers import initialization
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # zero3's building(): transformers partitions and initializes itself
        return auto.from_config(config, dtype=placement.dtype)
    with torch.device(placement.device) if on_device else contextlib.nullcontext():
        with initialization.no_init_weights():
            lm = auto.from_config(config, dtype=placement.dtype)
        lm.init_weights()
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


def lora_config(peft: PeftConfig, task: str = "causal_lm") -> Any:
    """peft's ``LoraConfig`` for the ``peft`` section; for classification SEQ_CLS, whose head peft trains in full
    (``modules_to_save``: it is new, adapters alone could not learn it)."""
    from peft import LoraConfig

    peft = section(peft, PeftConfig)
    targets = peft.target_modules
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
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


def apply_peft(model: Any, peft: PeftConfig, *, seed: int, gradient_checkpointing: bool = False,
               task: str = "causal_lm") -> Any:
    """Wrap in LoRA adapters when ``peft.name == lora``; otherwise return the model as is."""
    peft = section(peft, PeftConfig)
    if peft.name == "none":
        return model
    if peft.name not in ("lora", "qlora"):
        raise ModelInputError(f"peft.name={peft.name!r}: only none, lora and qlora are supported")
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_lora_targets(model, list(peft.target_modules))
    if peft.name == "qlora":  # fp32 norms and embeddings, input gradients for checkpointing (peft's QLoRA recipe)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed + 1)  # the adapters' init, the same on every rank
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(peft, task))
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# QLoRA (peft=qlora; docs/models.md): the loading hook of _instantiate


def qlora_quantization_config() -> Any:
    """The QLoRA paper's recipe: 4-bit NF4 base weights, double-quantized block constants, bf16 compute."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:  # a container image without it: one line, exit 2
        raise ModelInputError("peft.name='qlora' needs bitsandbytes in the job's Python (the container image): "
                              "pip install 'eurohpc-launcher[qlora]'")

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _local_dir(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ModelInputError(
            f"{key}={value!r}: no such local directory (compute nodes are offline: stage the model on the login "
            "node and give its directory)"
        )
    return path
