"""Value checks of the training sections: names, numeric ranges (finite numbers only), the model's shape, LoRA.

Each failure is a ConfigError naming the field, the value and what is allowed. Login node; stdlib only.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from launcher.config.schema import DATA_FORMATS, PEFT_METHODS, TRACKERS
from launcher.config.strategies import STRATEGIES, STRATEGY_NAMES
from launcher.errors import ConfigError

# field -> (lowest allowed, highest allowed, whether the lowest is allowed itself); None: unbounded.
_TRAIN_RANGES: dict[str, tuple[Optional[float], Optional[float], bool]] = {
    "max_steps": (1, None, True), "micro_batch_size": (1, None, True), "grad_accum": (1, None, True),
    "seq_len": (1, None, True), "save_every": (0, None, True), "eval_every": (0, None, True),  # 0: off
    "log_every": (1, None, True), "keep_last": (1, None, True), "eval_batches": (1, None, True),
    "lr": (0, None, False), "min_lr_ratio": (0, 1, True), "warmup_steps": (0, None, True),
    "weight_decay": (0, None, True), "grad_clip": (0, None, True), "debug_step_sleep_s": (0, None, True),
    "global_batch_size": (1, None, True), "save_every_minutes": (0, None, False), "keep_every": (1, None, True),
    "hang_timeout_s": (0, None, True), "straggler_every": (0, None, True), "straggler_ratio": (1, None, False),
    "debug_hang_at_step": (1, None, True), "debug_hang_rank": (0, None, True), "debug_slow_rank": (0, None, True),
    "debug_slow_factor": (0, None, True), "debug_hang_attempts": (1, None, True),
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
    _check_qlora(cfg)
    _check_trackers(cfg["train"])
    if cfg["data"]["format"] is not None:
        one_of("data.format", cfg["data"]["format"], DATA_FORMATS, "or null to detect it from the file")
    check_number("data.eval_fraction", cfg["data"]["eval_fraction"], 0, 1, True)
    if cfg["data"]["eval_fraction"] == 1:
        raise ConfigError("data.eval_fraction", 1, "a fraction in [0, 1): some data must be left to train on")
    for key, (low, high, low_ok) in _TRAIN_RANGES.items():
        check_number(f"train.{key}", cfg["train"][key], low, high, low_ok)
    one_of("train.debug_hang_in", cfg["train"].get("debug_hang_in", "collective"), ("collective", "sleep"))
    _check_checkpointing(cfg)
    for key, (low, high, low_ok) in _BUDGET_RANGES.items():
        check_number(f"budget.{key}", cfg["budget"][key], low, high, low_ok)
    _check_model(cfg["model"], cfg["train"]["seq_len"])
    if cfg["nproc_per_node"] is not None:
        check_number("nproc_per_node", cfg["nproc_per_node"], 1, None)
    check_number("nodes", cfg["nodes"], 1, None)


def _check_checkpointing(cfg: Mapping[str, Any]) -> None:
    """A Slurm job must checkpoint on its own: a crash (or a node failure) at hour 23 must not lose the run. Locally,
    train.save_every=0 (only at the end and on a stop) is allowed."""
    train = cfg["train"]
    if cfg.get("cluster") is not None and train["save_every"] == 0 and not train["save_every_minutes"]:
        raise ConfigError("train.save_every", 0, "a step count >= 1 for a Slurm job (or set train.save_every_minutes)",
                          "a job that crashes would lose everything since its start")


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
        from launcher.plan.shape import LORA_TARGETS

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


# Why each strategy but ddp cannot hold a 4-bit base (docs/models.md, "QLoRA").
_QLORA_REFUSED = {
    "deepspeed": "DeepSpeed casts the module to bf16 and flattens (ZeRO-3: partitions) its parameters, which breaks "
                 "bitsandbytes' packed 4-bit weights; and with a frozen 0.5 B/param base ZeRO has little to shard",
    "fsdp2": "this launcher's fsdp is FSDP2 (fully_shard), and bitsandbytes' FSDP recipe (bnb_4bit_quant_storage) is "
             "for FSDP1: 4-bit weights as DTensor shards are not supported by the pinned versions",
}


def _check_qlora(cfg: Mapping[str, Any]) -> None:
    """peft=qlora where bitsandbytes can run it: ddp, a CUDA device it supports, a pretrained base, adapter export."""
    if cfg["peft"]["name"] != "qlora":
        return
    from launcher.config.strategies import strategy_spec
    from launcher.plan.memory import QLORA_CPU_SINCE, QLORA_DEVICES, QLORA_STRATEGIES

    strategy = cfg["strategy"]["name"]
    if strategy not in QLORA_STRATEGIES:
        raise ConfigError("strategy.name", strategy, "ddp with peft=qlora (every rank holds the whole 4-bit "
                          "model)", _QLORA_REFUSED.get(strategy_spec(strategy).engine, ""))
    cluster = cfg.get("cluster")
    if cluster and cluster["device"] != "cpu":
        if cluster["device"] not in QLORA_DEVICES:
            raise ConfigError("cluster.device", cluster["device"], "a GPU bitsandbytes runs 4-bit on with peft=qlora: "
                              + ", ".join(QLORA_DEVICES), "bitsandbytes' ROCm backend is not verified on LUMI's "
                              "MI250X stack (and uses other block sizes): use peft=lora there")
    elif (cluster or not _local_gpus()) and not _bnb_runs_on_cpu():  # CPU ranks: bitsandbytes' CPU backend
        since = ".".join(map(str, QLORA_CPU_SINCE))
        raise ConfigError("peft.name", "qlora", f"a run with an NVIDIA GPU, or bitsandbytes >= {since} for CPU ranks "
                          f"(installed here: {_bnb_version() or 'none'})", "pip install -U bitsandbytes, or peft=lora")
    if cfg["model"]["pretrained"] is None and not cfg["dry_run"]:
        raise ConfigError("model.pretrained", None, "a pretrained model with peft=qlora (a random base quantized to "
                          "4 bits learns nothing)", "set model.pretrained=DIR or a Hub id; dry_run=true shows the plan")
    if cfg["train"]["export"] and not cfg["dry_run"]:
        raise ConfigError("train.export", True, "false with peft=qlora for now (the export rebuilds the base from "
                          "the trained weights, which are packed 4-bit ones)", "set train.export=false: the adapter "
                          "weights are in the checkpoints")
    if cfg["peft"]["merge_on_export"]:
        raise ConfigError("peft.merge_on_export", True, "false with peft=qlora (merging into a 4-bit base rounds "
                          "the adapters away)", "merge the adapter into the bf16 base offline")


def _local_gpus() -> int:
    from launcher.local import visible_gpus

    return visible_gpus()


def _bnb_version() -> Optional[str]:
    """The installed bitsandbytes' version, read from its metadata (importing it would import torch)."""
    from launcher.versions import package_version

    return package_version("bitsandbytes")


def _bnb_runs_on_cpu() -> bool:
    """bitsandbytes' CPU backend (4-bit NF4 on CPU ranks: local runs without a GPU, the local_slurm profile)."""
    from launcher.plan.memory import QLORA_CPU_SINCE

    found = _bnb_version()
    numbers = tuple(int(part) for part in re.findall(r"\d+", found or "")[:2])
    return found is not None and numbers >= QLORA_CPU_SINCE


def _check_trackers(train: Mapping[str, Any]) -> None:
    trackers = list(train.get("trackers") or [])
    for index, name in enumerate(trackers):
        one_of(f"train.trackers[{index}]", name, TRACKERS)
    if len(set(trackers)) != len(trackers):
        raise ConfigError("train.trackers", trackers, "each tracker at most once")
    uri = train.get("mlflow_tracking_uri")
    if uri is not None and "mlflow" not in trackers:
        raise ConfigError("train.mlflow_tracking_uri", uri, "only with mlflow in train.trackers",
                          "add it: train.trackers=[mlflow]")
    if uri is not None and not str(uri).strip():
        raise ConfigError("train.mlflow_tracking_uri", uri, "a tracking URI (http://host:5000, file:/path) or null "
                          "for a file store in the run directory")


def check_packages(cfg: Mapping[str, Any], find: Callable[[str], Any] = importlib.util.find_spec) -> None:
    """The optional packages the job imports (the trackers, bitsandbytes for qlora), in the Python that will run it:
    this interpreter for a local run or a cluster job without a container or ``cluster.python``; the image's Python
    for a container job, asked by starting the image once when its runtime and file are on this machine (else the
    job checks them first: exit 2, the same line). Another ``cluster.python`` is only checked by the job."""
    from launcher.train.trackers import tracker_names  # stdlib only at import: the job's one rule

    train = cfg["train"]
    needed = [("train.trackers", name) for name in tracker_names(train.get("trackers") or [], train["tensorboard"])]
    if cfg["peft"]["name"] == "qlora":
        needed.append(("peft.name", "bitsandbytes"))
    cluster = cfg.get("cluster") or {}
    if not needed or (cluster.get("python") and not cluster.get("container")):
        return
    if cluster.get("container"):
        missing, where = _missing_in_image(cluster["container"], [package for _, package in needed]), "the image"
    else:
        missing, where = [package for _, package in needed if find(package) is None], sys.executable
    for field, package in needed:
        if package in missing:
            extra = {"bitsandbytes": "qlora"}.get(package, package)
            raise ConfigError(field, package if field == "train.trackers" else "qlora",
                              f"{package} installed in the Python that runs the job ({where})",
                              f"pip install 'eurohpc-launcher[{extra}]' (or pip install {package})")


_PROBE = "import importlib.util as u, sys; print(' '.join(n for n in sys.argv[1:] if u.find_spec(n) is None))"


def _missing_in_image(container: Mapping[str, Any], packages: list) -> list:
    """The packages the container image's Python lacks; [] when it cannot be asked from here (no runtime or image on
    this machine, a runtime error, over a minute): the job checks them when it starts."""
    import shutil
    import subprocess

    from launcher.config.load import section
    from launcher.config.schema import ContainerConfig
    from launcher.container.exec import exec_command

    image = Path(str(container.get("image") or ""))
    if not shutil.which(str(container.get("runtime") or "")) or not image.is_file():
        return []
    argv = exec_command(section(dict(container), ContainerConfig), code_dir=None) + ["-c", _PROBE, *packages]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return done.stdout.split() if done.returncode == 0 else []
