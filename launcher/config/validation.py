"""Checks a composed config before anything is submitted or trained: the boundary between the user's input (a plain
tree, still untyped) and the typed world after ``launcher.config.to_typed``.

Types and key names are checked by the schema at composition (and here for keys added with '+'); then safety (no
control characters, no credentials, names that fit a directory and a bind), the training values
(``check_values``), the inputs on disk (``check_data``) and the cluster (``check_cluster``). Every failure is a
ConfigError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Iterator, Mapping

from launcher.config.check_cluster import check_cluster
from launcher.config.check_data import check_inputs
from launcher.config.check_values import check_packages, check_training
from launcher.config.schema import LauncherConfig
from launcher.errors import ConfigError
from launcher.secrets import is_secret_name, secret_in_value

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A run directory is bound into the container: Apptainer's bind list splits on ',' and ':'.
_UNBINDABLE = re.compile(r"[,:]")
MAX_RUN_NAME = 200


def validate(cfg: Mapping[str, Any]) -> str:
    """Raise ConfigError for the first value that cannot run; returns the data format (explicit or detected)."""
    _check_known_keys(cfg, LauncherConfig)
    _check_safety(cfg)
    check_training(cfg)
    if cfg.get("cluster"):
        check_cluster(cfg["cluster"], nodes=cfg["nodes"])
    elif cfg["nodes"] != 1:
        raise ConfigError("nodes", cfg["nodes"], "1 for a local run", "add +cluster=NAME to use several nodes")
    _check_task(cfg)
    check_packages(cfg)
    return check_inputs(cfg)


def _check_task(cfg: Mapping[str, Any]) -> None:
    """task.name, and for classification the labelled records (text and label fields) before anything is queued."""
    from launcher.config.check_values import one_of
    from launcher.config.schema import TASKS

    task = cfg.get("task") or {"name": "causal_lm"}
    one_of("task.name", task["name"], TASKS)
    if task["name"] != "classification":
        return
    from pathlib import Path

    from launcher.config.check_data import RECORDS_CHECKED
    from launcher.train.labelled_data import check_labelled_data

    path = cfg["data"]["path"]
    if not Path(str(path)).expanduser().exists():
        raise ConfigError("data.path", path, "an existing CSV or JSON Lines file (or directory) of labelled records")
    try:
        check_labelled_data(Path(str(path)).expanduser(), task["text_field"], task["label_field"], RECORDS_CHECKED)
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise ConfigError("data.path", str(path), f"records with task.text_field={task['text_field']} and "
                          f"task.label_field={task['label_field']}; {error}") from None


def check_interpolations(unresolved: Mapping[str, Any]) -> None:
    """Environment interpolations would write the variable's value (often a secret) into config.yaml and job.sh."""
    for field, value in _walk_keys_and_values(unresolved):
        if isinstance(value, str) and re.search(r"\$\{\s*oc\.env\s*:", value):
            raise ConfigError(
                field, value, "no ${oc.env:...} interpolations (they write the variable's value into files)",
                "export the variable in your shell before submitting: sbatch passes the environment to the job",
            )


def _check_known_keys(node: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """Keys added with Hydra's '+' bypass the schema's struct mode: a typo there would be silently ignored. Maps of
    dataclasses (``cluster.partitions.<name>``) are checked entry by entry."""
    hints = typing.get_type_hints(schema)
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(name, value, "a key of the schema: " + ", ".join(f"{prefix}{k}" for k in known))
        nested = _dataclass_of(hints[key])
        if nested is not None and isinstance(value, Mapping):
            _check_known_keys(value, nested, prefix=f"{name}.")
        entries = _dict_of_dataclass(hints[key])
        if entries is not None and isinstance(value, Mapping):
            for entry, limits in value.items():
                if isinstance(limits, Mapping):
                    _check_known_keys(limits, entries, prefix=f"{name}.{entry}.")


def _dict_of_dataclass(hint: Any) -> type | None:
    if typing.get_origin(hint) in (dict, typing.Dict):
        args = typing.get_args(hint)
        return args[1] if len(args) == 2 and dataclasses.is_dataclass(args[1]) else None
    return None


def _dataclass_of(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) is typing.Union:  # Optional[SomeConfig]
        return next((arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), None)
    return None



def _check_safety(cfg: Mapping[str, Any]) -> None:
    for field, key_or_value in _walk_keys_and_values(cfg):
        if not isinstance(key_or_value, str):
            continue
        if _CONTROL.search(key_or_value):
            raise ConfigError(field, key_or_value, "printable characters only (no newlines or control characters)")
        why = secret_in_value(key_or_value)
        if why:
            raise ConfigError(
                field, "<redacted>", f"no credentials in the config ({why})",
                "export the secret in your shell instead (e.g. HF_TOKEN): sbatch passes it to the job unwritten",
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
    _check_names(cfg)


def _check_names(cfg: Mapping[str, Any]) -> None:
    run_name, output_dir = cfg["run_name"], cfg["output_dir"]
    if not run_name or "/" in run_name or run_name in (".", "..") or len(run_name) > MAX_RUN_NAME:
        raise ConfigError("run_name", run_name,
                          f"a non-empty name without '/' of at most {MAX_RUN_NAME} characters (it names a directory)")
    for field, value in (("run_name", run_name), ("output_dir", output_dir)):
        if _UNBINDABLE.search(str(value)):
            raise ConfigError(field, value, "no ',' or ':' (the run directory is bound into the container by path)")
    if not str(output_dir).strip():
        raise ConfigError("output_dir", output_dir, "a directory path")
    if (cfg.get("cluster") or {}).get("container"):
        inputs = {"data.path": cfg["data"]["path"], "data.cache_dir": cfg["data"]["cache_dir"],
                  "model.pretrained": cfg["model"]["pretrained"], "model.tokenizer": cfg["model"]["tokenizer"]}
        for field, value in inputs.items():
            if value and _UNBINDABLE.search(str(value)):
                raise ConfigError(field, value, "a path without ',' or ':' (it is bound into the container by path)")


def _walk_keys_and_values(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(field, value) for every leaf, and (field, key) for every mapping key (a key reaches scripts too)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            field = f"{prefix}.{key}" if prefix else str(key)
            yield field, key
            yield from _walk_keys_and_values(value, field)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk_keys_and_values(value, f"{prefix}[{index}]")
    else:
        yield prefix, node


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
