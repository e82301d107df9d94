"""Export to a Hugging Face directory, the same way for every strategy.

The strategy gathers the full weights on rank 0 (``Strategy.full_state_dict``: DDP copies its replica, FSDP2 and
ZeRO-3 consolidate their shards). Rank 0 then loads them into a clean CPU model of the same class (built on the meta
device, so no second random init) and writes ``save_pretrained`` into ``<export>.tmp``, renamed to ``<export>`` when
complete: a reader never sees half an export.

Layout of ``<run_dir>/export/``:

- full training: the model (``config.json``, ``model.safetensors``, ``generation_config.json``) and the tokenizer:
  ``AutoModelForCausalLM.from_pretrained(export)``.
- LoRA: the adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer:
  ``PeftModel.from_pretrained(base, export)``. ``base_model_name_or_path`` points to ``model.pretrained``; a base built
  from the config (no pretrained directory) is written to ``export/base_model/`` and the adapter points there, so
  ``AutoPeftModelForCausalLM.from_pretrained(export)`` works offline. With ``peft.merge_on_export=true`` the merged
  model (adapters folded into the weights) is in ``export/merged/`` (``rundir.MERGED_DIR``; ``python -m launcher.export
  RUN_DIR --merge`` writes it after the fact).

Weights are saved in the training precision (bf16 on GPUs, fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

import torch

from launcher.rundir import MERGED_DIR
from launcher.train.distributed import barrier, log

if TYPE_CHECKING:
    from launcher.config.schema import PeftConfig


def export_model(strategy: Any, directory: Path, tokenizer: Any, *, peft: Optional["PeftConfig"] = None,
                 pretrained: Optional[str] = None, task: str = "causal_lm") -> Optional[Path]:
    """Collective: every rank calls it; rank 0 writes ``directory``. Returns the directory on rank 0.

    ``peft``: the run's adapter settings (an adapter export unless its name is ``none``); ``pretrained``: the base
    model's directory, which the adapter then points to. Weights keep the training precision (``strategy.precision``).
    """
    state_dict = strategy.full_state_dict()
    result = None
    if strategy.env.is_main:
        assert state_dict is not None
        result = write_export(
            state_dict,
            Path(directory),
            config=_hf_config_of(strategy.module),
            tokenizer=tokenizer,
            peft_cfg=peft if peft is not None and peft.name != "none" else None,
            pretrained=pretrained,
            dtype=export_dtype(strategy.precision),
            task=task,
        )
    barrier()
    return result


def export_dtype(precision: str) -> torch.dtype:
    """The dtype of exported weights: the training precision (bf16 or fp32)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


@contextlib.contextmanager
def _deepspeed_left_unimported() -> Iterator[None]:
    """save_pretrained unwraps the model through accelerate, which imports deepspeed whenever it is installed (2-3 s,
    with mlflow and wandb behind it) only to test isinstance(model, DeepSpeedEngine). A run that never imported
    deepspeed cannot hold one, so the check is skipped for it."""
    if "deepspeed" in sys.modules:
        yield
        return
    import accelerate.utils.other as accelerate_other

    saved = accelerate_other.is_deepspeed_available
    accelerate_other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        accelerate_other.is_deepspeed_available = saved


def _hf_config_of(module: Any) -> Any:
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return base.config


def write_export(
    state_dict: Dict[str, torch.Tensor],
    directory: Path,
    *,
    config: Any,
    tokenizer: Any,
    peft_cfg: Any = None,
    pretrained: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    task: str = "causal_lm",
) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-shard progress bars in Slurm logs
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    if peft_cfg is None:
        model = _clean_model(config, dtype, task)
        _load(model, state_dict)
        with _deepspeed_left_unimported():
            model.save_pretrained(tmp)
    else:
        _write_peft(state_dict, tmp, directory, config=config, peft_cfg=peft_cfg, pretrained=pretrained, dtype=dtype,
                    task=task)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        if (tmp / MERGED_DIR).is_dir():  # the merged model is standalone: it carries the tokenizer too
            tokenizer.save_pretrained(tmp / MERGED_DIR)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    log(f"exported the model to {directory}")
    return directory


def _write_peft(
    state_dict: Dict[str, torch.Tensor],
    tmp: Path,
    final: Path,
    *,
    config: Any,
    peft_cfg: Any,
    pretrained: Optional[str],
    dtype: torch.dtype,
    task: str = "causal_lm",
) -> None:
    from peft import get_peft_model, set_peft_model_state_dict

    from launcher.train.modeling import lora_config

    # A trained head (classification: peft's modules_to_save copy) belongs to the adapter; its frozen original to
    # the base.
    base_sd = {_base_key(k): v for k, v in state_dict.items() if not _adapter_key(k)}
    adapter_sd = {k: v for k, v in state_dict.items() if _adapter_key(k)}
    base = _clean_model(config, dtype, task)
    _load(base, base_sd)
    if pretrained:
        base_path = str(Path(pretrained).expanduser().resolve())
    else:
        base.save_pretrained(tmp / "base_model")
        base_path = str((final / "base_model").resolve())
    lora = lora_config(peft_cfg, task)
    lora.base_model_name_or_path = base_path
    base.name_or_path = base_path  # peft copies it into adapter_config.json
    base.config._name_or_path = base_path
    peft_model = get_peft_model(base, lora)
    # peft's own key mapping (drops the adapter name), then a strict check that every adapter weight arrived.
    result = set_peft_model_state_dict(peft_model, _without_adapter_name(adapter_sd))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"export: adapter weights not placed in the model: {unexpected[:5]}")
    peft_model.peft_config["default"].base_model_name_or_path = base_path
    # Embeddings are not adapted: no need for peft to compare vocabularies with the (not yet renamed) base.
    peft_model.save_pretrained(tmp, save_embedding_layers=False)
    if peft_cfg.merge_on_export:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(tmp / MERGED_DIR)


def _adapter_key(key: str) -> bool:
    return ".lora_" in key or ".modules_to_save." in key


def _base_key(key: str) -> str:
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _without_adapter_name(adapter_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``base_model.model.x.lora_A.default.weight`` -> ``base_model.model.x.lora_A.weight`` and
    ``base_model.model.score.modules_to_save.default.weight`` -> ``base_model.model.score.weight`` (peft's saved
    forms)."""
    return {k.replace(".modules_to_save.default.", ".").replace(".default.", "."): v for k, v in adapter_sd.items()}


def _clean_model(config: Any, dtype: torch.dtype, task: str = "causal_lm") -> Any:
    """An empty model of the config's class: parameters on the meta device, real buffers (rotary tables)."""
    from accelerate import init_empty_weights

    from launcher.train.modeling import model_class

    with init_empty_weights(include_buffers=False):
        return model_class(task).from_config(config, dtype=dtype)


def _load(model: Any, state_dict: Dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not _tied_key(model, k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"export: the gathered weights do not match {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"export: weights never loaded: {leftover[:5]}")


def _tied_key(model: Any, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key in set(keys)
