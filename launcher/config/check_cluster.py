"""Checks of the ``cluster`` section: the partition's and QOS's limits, the account, the node's hardware, and every
value that reaches the batch script's shell (interpreter, templates, sbatch options). Login node; stdlib only."""

from __future__ import annotations

import re
from typing import Any, Mapping

from launcher.config.check_values import check_number, one_of
from launcher.config.schema import requested_gpus, tasks_on_node
from launcher.errors import ConfigError
from launcher.paths import TEMPLATES_DIR
from launcher.plan.devices import DEVICES
from launcher.plan.slurm_time import format_time, parse_time

BILLING_UNITS = ("gpu_hours", "node_hours", "core_hours")
BACKENDS = ("nccl", "gloo")
RUNTIMES = ("singularity", "apptainer")
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.sh$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
# Words of an interpreter command line: no shell syntax (quoting makes them data, but they must still name a program).
_COMMAND_WORD = re.compile(r"^[A-Za-z0-9_./+=,:@%-]+$")
_HOSTLIST = re.compile(r"^[A-Za-z0-9\[\],.-]+$")
_MEMORY = re.compile(r"^\d+(\.\d+)?[KMGT]?B?$", re.IGNORECASE)
# sbatch options the launcher sets itself: an sbatch_extra entry would silently fight them.
_OWN_SBATCH = ("job-name", "partition", "time", "nodes", "ntasks-per-node", "cpus-per-task", "signal", "output",
               "error", "open-mode", "requeue", "account", "qos", "gpus-per-node", "mem", "mem-per-gpu", "exclusive",
               "exclude", "wrap")
_CLUSTER_NUMBERS = {
    "gpus_per_node": (0, None, True), "cpus_per_node": (1, None, True), "cpus_per_task": (1, None, True),
    "signal_lead_s": (0, None, True), "max_requeues": (0, None, True), "max_node_exclusions": (0, None, True), "gpus_per_billing_gpu": (1, None, True),
    "billing_cores_per_gpu": (1, None, True), "billing_mem_gb_per_gpu": (0, None, False),
    "expected_busbw_gbps": (0, None, False), "gpus_per_node_requested": (0, None, True),
    "tasks_per_node": (1, None, True),
}


def check_cluster(cluster: Mapping[str, Any], *, nodes: int) -> None:
    for key, (low, high, low_ok) in _CLUSTER_NUMBERS.items():
        check_number(f"cluster.{key}", cluster[key], low, high, low_ok)
    _check_account(cluster)
    one_of("cluster.backend", cluster["backend"], BACKENDS)
    one_of("cluster.billing_unit", cluster["billing_unit"], BILLING_UNITS)
    one_of("cluster.device", cluster["device"], tuple(sorted(DEVICES)))
    walltime = _check_limits(cluster, nodes=nodes)
    if cluster["signal_lead_s"] >= walltime:
        raise ConfigError("cluster.signal_lead_s", cluster["signal_lead_s"], f"less than the walltime ({walltime} s)")
    for key in ("mem", "mem_per_gpu"):
        if cluster[key] is not None and not _MEMORY.match(str(cluster[key])):
            raise ConfigError(f"cluster.{key}", cluster[key], "a Slurm memory size such as 60G or 480000M")
    _check_node_shape(cluster)
    check_shell_inputs(cluster)


def _check_limits(cluster: Mapping[str, Any], *, nodes: int) -> int:
    """The partition and QOS exist and allow this many nodes for this long; returns the walltime in seconds."""
    partitions, partition = cluster["partitions"], cluster["partition"]
    if partitions and partition not in partitions:
        one_of("cluster.partition", partition, tuple(partitions))
    limits = [("cluster.partition", partition, partitions.get(partition))]
    qos, table = cluster["qos"], cluster["qos_limits"]
    if table:
        if qos is None or qos not in table:
            one_of("cluster.qos", qos, tuple(table))
        limits.append(("cluster.qos", qos, table[qos]))
    elif qos is not None:
        raise ConfigError("cluster.qos", qos, f"none on {cluster['name']}: its profile lists no QOS",
                          "leave cluster.qos unset, or add the QOS and its limits to cluster.qos_limits")
    try:
        walltime = parse_time(cluster["time"])
    except ValueError as error:
        raise ConfigError("cluster.time", cluster["time"], str(error)) from None
    for field, name, limit in limits:
        if limit is not None:
            _check_one_limit(field, name, limit, nodes=nodes, walltime=walltime)
    return walltime


def _check_one_limit(field: str, name: str, limit: Mapping[str, Any], *, nodes: int, walltime: int) -> None:
    try:
        max_time = parse_time(limit["max_time"])
    except ValueError as error:
        raise ConfigError(f"{field}s.{name}.max_time", limit["max_time"], str(error)) from None
    if not limit["min_nodes"] <= nodes <= limit["max_nodes"]:
        raise ConfigError(
            "nodes", nodes, f"{limit['min_nodes']}..{limit['max_nodes']} on {field}={name}",
            "choose another partition or QOS" if nodes > limit["max_nodes"] else "",
        )
    if walltime > max_time:
        raise ConfigError("cluster.time", format_time(walltime), f"at most {format_time(max_time)} on {field}={name}")


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
    requested = requested_gpus(gpus, cluster["gpus_per_node_requested"])
    if not 0 <= requested <= gpus:
        raise ConfigError("cluster.gpus_per_node_requested", requested, f"0..{gpus} (GPUs on one {cluster['name']} node)")
    tasks = tasks_on_node(cluster["tasks_per_node"], requested)
    if tasks < 1 or (requested and tasks > requested):
        raise ConfigError("cluster.tasks_per_node", tasks, f"1..{requested or 'n'} (one task per GPU at most)")
    if tasks * cluster["cpus_per_task"] > cluster["cpus_per_node"]:
        raise ConfigError(
            "cluster.cpus_per_task", cluster["cpus_per_task"],
            f"at most {cluster['cpus_per_node'] // tasks} with {tasks} tasks per node "
            f"({cluster['cpus_per_node']} usable cores per node)",
        )


def check_shell_inputs(cluster: Mapping[str, Any]) -> None:
    """What the batch script runs or inlines: templates only from slurm_templates/, plain interpreter words, sbatch
    option names, host lists, variable names."""
    for key in ("setup_template", "teardown_template"):
        name = cluster[key]
        if name is not None and (not _TEMPLATE_NAME.match(name) or not (TEMPLATES_DIR / name).is_file()):
            available = ", ".join(sorted(p.name for p in TEMPLATES_DIR.glob("*.sh")))
            raise ConfigError(f"cluster.{key}", name, f"a template file name in slurm_templates/: {available}")
    _check_command("cluster.python", cluster["python"])
    container = cluster["container"]
    if container is not None:
        _check_command("cluster.container.python", container["python"])
        runtime = str(container["runtime"]).rsplit("/", 1)[-1]
        one_of("cluster.container.runtime", runtime, RUNTIMES, "or an absolute path to one of them")
        if not str(container["image"]).strip():
            raise ConfigError("cluster.container.image", container["image"], "the path of a .sif image")
    for key in cluster["sbatch_extra"]:
        if not _SBATCH_KEY.match(str(key)) or key in _OWN_SBATCH:
            raise ConfigError(f"cluster.sbatch_extra.{key}", key,
                              "an sbatch long option name ([a-z][a-z0-9-]*) that the launcher does not set itself")
    if cluster["exclude_nodes"] is not None and not _HOSTLIST.match(cluster["exclude_nodes"]):
        raise ConfigError("cluster.exclude_nodes", cluster["exclude_nodes"], "a Slurm host list such as nid[001-004]")
    var = cluster["visible_devices_var"]
    if var is not None and not re.match(r"^[A-Z_][A-Z0-9_]*$", var):
        raise ConfigError("cluster.visible_devices_var", var, "an environment variable name")


def _check_command(field: str, value: Any) -> None:
    if value is None:
        return
    words = str(value).split()
    if not words or not all(_COMMAND_WORD.match(word) for word in words):
        raise ConfigError(field, value, "an interpreter and its options as plain words (no shell syntax)")
