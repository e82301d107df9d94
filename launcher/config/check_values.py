"""Value checks of the training sections: names, numeric ranges (finite numbers only), the model's shape, LoRA.

Each failure is a ConfigError naming the field, the value and what is allowed. Login node; stdlib only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from launcher.config.schema import DATA_FORMATS, PEFT_METHODS
from launcher.config.strategies import STRATEGIES, STRATEGY_NAMES
from launcher.errors import ConfigError

# field -> (lowest allowed, highest allowed, whether the lowest is allowed itself); None: unbounded.
_TRAIN_RANGES: dict[str, tuple[Optional[float], Optional[float], bool]] = {
    "max_steps": (1, None, True), "micro_batch_size": (1, None, True), "grad_accum": (1, None, True),
    "seq_len": (1, None, True), "save_every": (1, None, True), "eval_every": (1, None, True),
    "log_every": (1, None, True), "keep_last": (1, None, True), "eval_batches": (1, None, True),
    "lr": (0, None, False), "min_lr_ratio": (0, 1, True), "warmup_steps": (0, None, True),
    "weight_decay": (0, None, True), "grad_clip": (0, None, True), "debug_step_sleep_s": (0, None, True),
    "global_batch_size": (1, None, True), "save_every_minutes": (0, None, False), "keep_every": (1, None, True),
    "hang_timeout_s": (0, None, True), "straggler_every": (0, None, True), "straggler_ratio": (1, None, False),
    "debug_hang_at_step": (1, None, True), "debug_hang_rank": (0, None, True), "debug_slow_rank": (0, None, True),
    "debug_slow_factor": (0, None, True),
}
_MODEL_RANGES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings")
_BUDGET_RANGES: dict[str, tuple[Optional[float], Optional[float], bool]] = {
    "tokens": (0, None, False), "tokens_per_s_per_device": (0, None, False), "mfu": (0, 1, False),
}


def check_number(field: str, value: Any, low: Optional[float], high: Optional[float], low_ok: bool = True) -> None:
    """A finite number within [low, high] (or (low, high] when ``low_ok`` is False); None passes (optional)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(field, value, "a finite number")
    too_low = low is not None and (value < low or (value == low and not low_ok))
    too_high = high is not None and value > high
    if too_low or too_high:
        raise ConfigError(field, value, _range_text(value, low, high, low_ok))


def _range_text(value: Any, low: Optional[float], high: Optional[float], low_ok: bool) -> str:
    kind = "an integer" if isinstance(value, int) else "a number"
    if high is None:
        return f"{kind} {'>=' if low_ok else '>'} {low}"
    if low is None:
        return f"{kind} <= {high}"
    return f"{kind} in {'[' if low_ok else '('}{low}, {high}]"


def one_of(field: str, value: Any, allowed: tuple, hint: str = "") -> None:
    if value not in allowed:
        raise ConfigError(field, value, "one of " + ", ".join(map(str, allowed)), hint)


def check_training(cfg: Mapping[str, Any]) -> None:
    _check_strategy(cfg["strategy"])
    _check_peft(cfg["peft"], cfg["model"])
    if cfg["data"]["format"] is not None:
        one_of("data.format", cfg["data"]["format"], DATA_FORMATS, "or null to detect it from the file")
    check_number("data.eval_fraction", cfg["data"]["eval_fraction"], 0, 1, True)
    if cfg["data"]["eval_fraction"] == 1:
        raise ConfigError("data.eval_fraction", 1, "a fraction in [0, 1): some data must be left to train on")
    for key, (low, high, low_ok) in _TRAIN_RANGES.items():
        check_number(f"train.{key}", cfg["train"][key], low, high, low_ok)
    one_of("train.debug_hang_in", cfg["train"].get("debug_hang_in", "collective"), ("collective", "sleep"))
    for key, (low, high, low_ok) in _BUDGET_RANGES.items():
        check_number(f"budget.{key}", cfg["budget"][key], low, high, low_ok)
    _check_model(cfg["model"], cfg["train"]["seq_len"])
    if cfg["nproc_per_node"] is not None:
        check_number("nproc_per_node", cfg["nproc_per_node"], 1, None)
    check_number("nodes", cfg["nodes"], 1, None)


def _check_strategy(strategy: Mapping[str, Any]) -> None:
    one_of("strategy.name", strategy["name"], STRATEGY_NAMES)
    spec = STRATEGIES[strategy["name"]]
    one_of("strategy.precision", strategy["precision"], ("auto", "bf16", "fp32"))
    if strategy["offload_params"] and not spec.can_offload_params:
        raise ConfigError("strategy.offload_params", True, "only with zero3 or fsdp", "use strategy=zero3")
    if strategy["offload_optimizer"] and not spec.can_offload_optimizer:
        raise ConfigError("strategy.offload_optimizer", True, "zero1, zero2, zero3 or fsdp")


def _check_peft(peft: Mapping[str, Any], model: Mapping[str, Any]) -> None:
    one_of("peft.name", peft["name"], PEFT_METHODS)
    if peft["name"] == "none":
        return
    check_number("peft.r", peft["r"], 1, None)
    check_number("peft.alpha", peft["alpha"], 0, None, False)
    check_number("peft.dropout", peft["dropout"], 0, 1, True)
    if peft["dropout"] == 1:
        raise ConfigError("peft.dropout", 1, "a probability in [0, 1)")
    if not peft["target_modules"]:
        raise ConfigError("peft.target_modules", peft["target_modules"], "at least one module name (e.g. q_proj)")
    if model["pretrained"] is None and model["arch"] == "llama":
        # A model built from the config is a Llama decoder: its linear layers are known here. A pretrained one's are
        # checked against the real model in the job.
        from launcher.plan.memory import LORA_TARGETS

        unknown = sorted(set(peft["target_modules"]) - set(LORA_TARGETS))
        if unknown:
            raise ConfigError("peft.target_modules", unknown, f"names of the model's linear layers: {', '.join(LORA_TARGETS)}")


def _check_model(model: Mapping[str, Any], seq_len: int) -> None:
    for key in _MODEL_RANGES:
        check_number(f"model.{key}", model[key], 1, None)
    check_number("model.rope_theta", model["rope_theta"], 0, None, False)
    if model["hidden_size"] % model["num_heads"]:
        raise ConfigError("model.num_heads", model["num_heads"],
                          f"a divisor of model.hidden_size={model['hidden_size']}")
    if model["num_heads"] % model["num_kv_heads"]:
        raise ConfigError("model.num_kv_heads", model["num_kv_heads"],
                          f"a divisor of model.num_heads={model['num_heads']} (grouped-query attention)")
    if seq_len > model["max_position_embeddings"]:
        raise ConfigError(
            "train.seq_len", seq_len,
            f"at most model.max_position_embeddings={model['max_position_embeddings']} for model {model['name']}",
        )
