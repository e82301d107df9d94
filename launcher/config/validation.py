"""Checks a resolved config before anything is submitted or trained.

Types and key names are already checked by the schema at composition; these are the checks of values: allowed
names, the partition's and QOS's limits, the account, the hardware of a node, and safety (no control characters,
no secrets). Every failure is a ConfigError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping

import dataclasses
import typing

from launcher.config.schema import DATA_FORMATS, PEFT_METHODS, LauncherConfig, requested_gpus, tasks_on_node
from launcher.config.strategies import STRATEGIES, STRATEGY_NAMES
from launcher.errors import ConfigError
from launcher.secrets import is_secret_name, looks_like_token
from launcher.plan.slurm_time import format_time, parse_time

BILLING_UNITS = ("gpu_hours", "node_hours", "core_hours")
BACKENDS = ("nccl", "gloo")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first value that cannot run."""
    _check_known_keys(cfg, LauncherConfig)
    _check_safety(cfg)
    _check_training(cfg)
    if cfg.get("cluster"):
        _check_cluster(cfg["cluster"], nodes=cfg["nodes"])
    elif cfg["nodes"] != 1:
        raise ConfigError("nodes", cfg["nodes"], "1 for a local run", "add +cluster=NAME to use several nodes")


def _check_known_keys(node: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """Keys added with Hydra's '+' bypass the schema's struct mode: a typo there would be silently ignored."""
    hints = typing.get_type_hints(schema)
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(name, value, "a key of the schema: " + ", ".join(f"{prefix}{k}" for k in known))
        nested = _dataclass_of(hints[key])
        if nested is not None and isinstance(value, Mapping):
            _check_known_keys(value, nested, prefix=f"{name}.")


def _dataclass_of(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) is typing.Union:  # Optional[SomeConfig]
        return next((arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), None)
    return None


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk(value, f"{prefix}[{index}]")
    else:
        yield prefix, node


def _check_safety(cfg: Mapping[str, Any]) -> None:
    for field, value in _walk(cfg):
        if not isinstance(value, str):
            continue
        if _CONTROL.search(value):
            raise ConfigError(field, value, "printable characters only (no newlines or control characters)")
        # Credentials reach jobs through the submitting shell's environment (sbatch exports it), never a file we
        # write. A 40-hex path component (an HF snapshot) is not a value on its own, so paths pass.
        if looks_like_token(value):
            raise ConfigError(
                field, "<redacted>", "no credentials in the config",
                "export the token in your shell instead (e.g. HF_TOKEN): sbatch passes it to the job unwritten",
            )
    cluster = cfg.get("cluster") or {}
    for name in (cluster.get("env") or {}):
        if not _ENV_NAME.match(name):
            raise ConfigError(f"cluster.env.{name}", name, "a shell variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if is_secret_name(name):
            raise ConfigError(
                f"cluster.env.{name}", "<redacted>", "no credentials in cluster.env (it is written into the script)",
                f"export {name} in your shell before submitting: sbatch passes it to the job unwritten",
            )
    run_name = cfg["run_name"]
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise ConfigError("run_name", run_name, "a non-empty name without '/' (it names a directory under output_dir)")


def _check_training(cfg: Mapping[str, Any]) -> None:
    strategy = cfg["strategy"]
    _one_of("strategy.name", strategy["name"], STRATEGY_NAMES)
    spec = STRATEGIES[strategy["name"]]
    _one_of("strategy.precision", strategy["precision"], ("auto", "bf16", "fp32"))
    if strategy["offload_params"] and not spec.can_offload_params:
        raise ConfigError("strategy.offload_params", True, "only with zero3 or fsdp", "use strategy=zero3")
    if strategy["offload_optimizer"] and not spec.can_offload_optimizer:
        raise ConfigError("strategy.offload_optimizer", True, "zero1, zero2, zero3 or fsdp")
    _one_of("peft.name", cfg["peft"]["name"], PEFT_METHODS)
    if cfg["data"]["format"] is not None:
        _one_of("data.format", cfg["data"]["format"], DATA_FORMATS, "or null to detect it from the file")
    train = cfg["train"]
    for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "save_every", "eval_every", "log_every",
                "keep_last", "eval_batches"):
        if train[key] < 1:
            raise ConfigError(f"train.{key}", train[key], "an integer >= 1")
    if train["lr"] <= 0:
        raise ConfigError("train.lr", train["lr"], "a positive learning rate")
    if not 0.0 <= cfg["data"]["eval_fraction"] < 1.0:
        raise ConfigError("data.eval_fraction", cfg["data"]["eval_fraction"], "a fraction in [0, 1)")
    _check_input_paths(cfg)
    model = cfg["model"]
    if train["seq_len"] > model["max_position_embeddings"]:
        raise ConfigError(
            "train.seq_len", train["seq_len"],
            f"at most model.max_position_embeddings={model['max_position_embeddings']} for model {model['name']}",
        )
    if cfg["nproc_per_node"] is not None and cfg["nproc_per_node"] < 1:
        raise ConfigError("nproc_per_node", cfg["nproc_per_node"], "an integer >= 1, or null for one per GPU")
    if cfg["nodes"] < 1:
        raise ConfigError("nodes", cfg["nodes"], "an integer >= 1")


def apply_global_batch(cfg: LauncherConfig, world_size: int) -> LauncherConfig:
    """With train.global_batch_size set, derive train.grad_accum for this world size (strong scaling)."""
    train = cfg.train
    target = train.global_batch_size
    if target is None:
        return cfg
    per_step = train.micro_batch_size * world_size
    if target < per_step or target % per_step:
        raise ConfigError(
            "train.global_batch_size", target,
            f"a multiple of train.micro_batch_size x world size = {train.micro_batch_size} x {world_size}",
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(train, grad_accum=target // per_step))


def _check_input_paths(cfg: Mapping[str, Any]) -> None:
    """Inputs must exist before hours in the queue: the login node sees the same shared file systems as the job."""
    data_path = Path(cfg["data"]["path"]).expanduser()
    if not data_path.exists():
        raise ConfigError("data.path", str(data_path), "an existing file or directory of data files")
    for key in ("pretrained", "tokenizer"):
        value = cfg["model"][key]
        if value is not None and not Path(value).expanduser().is_dir():
            raise ConfigError(f"model.{key}", value, "an existing local directory (compute nodes never download)")


def _check_cluster(cluster: Mapping[str, Any], *, nodes: int) -> None:
    _check_account(cluster)
    _one_of("cluster.backend", cluster["backend"], BACKENDS)
    _one_of("cluster.billing_unit", cluster["billing_unit"], BILLING_UNITS)
    partitions = cluster["partitions"]
    partition = cluster["partition"]
    if partitions and partition not in partitions:
        _one_of("cluster.partition", partition, tuple(partitions))
    limits = [("cluster.partition", partition, partitions.get(partition))]
    qos = cluster["qos"]
    if cluster["qos_limits"]:
        if qos is None or qos not in cluster["qos_limits"]:
            _one_of("cluster.qos", qos, tuple(cluster["qos_limits"]))
        limits.append(("cluster.qos", qos, cluster["qos_limits"][qos]))
    try:
        walltime = parse_time(cluster["time"])
    except ValueError as error:
        raise ConfigError("cluster.time", cluster["time"], str(error)) from None
    for field, name, limit in limits:
        if limit is None:
            continue
        if not limit["min_nodes"] <= nodes <= limit["max_nodes"]:
            raise ConfigError(
                "nodes", nodes, f"{limit['min_nodes']}..{limit['max_nodes']} on {field}={name}",
                "choose another partition or QOS" if nodes > limit["max_nodes"] else "",
            )
        max_time = parse_time(limit["max_time"])
        if walltime > max_time:
            raise ConfigError("cluster.time", cluster["time"], f"at most {format_time(max_time)} on {field}={name}")
    if cluster["signal_lead_s"] >= walltime:
        raise ConfigError(
            "cluster.signal_lead_s", cluster["signal_lead_s"], f"less than the walltime ({walltime} s)",
        )
    _check_node_shape(cluster)


def _check_account(cluster: Mapping[str, Any]) -> None:
    account = cluster["account"]
    if account is None:
        if cluster["account_required"]:
            raise ConfigError(
                "cluster.account", None, f"a project account matching {cluster['account_pattern']!r}",
                f"add cluster.account=... (required on {cluster['name']})",
            )
        return
    if not re.fullmatch(cluster["account_pattern"], account):
        raise ConfigError("cluster.account", account, f"an account matching {cluster['account_pattern']!r}")


def _check_node_shape(cluster: Mapping[str, Any]) -> None:
    gpus = cluster["gpus_per_node"]
    requested = gpus_requested(cluster)
    if not 0 <= requested <= gpus:
        raise ConfigError("cluster.gpus_per_node_requested", requested, f"0..{gpus} (GPUs on one {cluster['name']} node)")
    tasks = tasks_per_node(cluster)
    if tasks < 1 or (requested and tasks > requested):
        raise ConfigError("cluster.tasks_per_node", tasks, f"1..{requested or 'n'} (one task per GPU at most)")
    cpus = tasks * cluster["cpus_per_task"]
    if cpus > cluster["cpus_per_node"]:
        raise ConfigError(
            "cluster.cpus_per_task", cluster["cpus_per_task"],
            f"at most {cluster['cpus_per_node'] // tasks} with {tasks} tasks per node "
            f"({cluster['cpus_per_node']} usable cores per node)",
        )


def gpus_requested(cluster: Mapping[str, Any]) -> int:
    """``ClusterConfig.gpus_requested`` for the not yet typed input."""
    return requested_gpus(cluster["gpus_per_node"], cluster["gpus_per_node_requested"])


def tasks_per_node(cluster: Mapping[str, Any]) -> int:
    """``ClusterConfig.tasks`` for the not yet typed input."""
    return tasks_on_node(cluster["tasks_per_node"], gpus_requested(cluster))


def _one_of(field: str, value: Any, allowed: tuple, hint: str = "") -> None:
    if value not in allowed:
        raise ConfigError(field, value, "one of " + ", ".join(map(str, allowed)), hint)
