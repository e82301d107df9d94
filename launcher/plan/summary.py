"""The human-readable summary printed before (or instead of) submitting."""

from __future__ import annotations


from launcher.config.schema import LauncherConfig

from launcher.plan.job import JobPlan

from launcher.plan.billing import UNIT_NAMES, core_hours, idle_gpu_warning, is_whole_node


def cluster_summary(cfg: LauncherConfig, plan: JobPlan) -> str:
    cluster = cfg.cluster
    gpus = f"{plan.gpus_per_node} GPUs ({cluster.device})" if plan.gpus_per_node else "no GPUs (CPU)"
    rows = [
        ("cluster", f"{plan.cluster}: partition {cluster.partition}, qos {cluster.qos or '-'}, "
                    f"account {cluster.account or '-'}"),
        ("nodes", f"{plan.nodes} x {gpus}, {plan.tasks_per_node} tasks/node x {plan.cpus_per_task} CPUs"),
        ("world size", str(plan.world_size)),
        ("walltime", plan.walltime),
        ("cost", _cost(cfg, plan)),
    ]
    warning = idle_gpu_warning(cluster)
    if warning:
        rows.append(("", warning))
    attention = [("attention", planned_attention(cfg))]
    return _table(rows + _training_rows(cfg, plan.world_size) + attention + [("run dir", str(plan.run_dir))])


def _cost(cfg: LauncherConfig, plan: JobPlan) -> str:
    """The request's cost in the machine's unit (Leonardo: also in core-hours, what ``saldo -b`` reports)."""
    cluster = cfg.cluster
    text = f"{plan.billing_units:,.2f} {UNIT_NAMES[plan.billing_unit]}"
    if plan.billing_unit == "node_hours" and cluster.gpus_per_node:
        text += f" = {core_hours(cluster, plan.nodes, plan.walltime_s):,.0f} core-hours"
    share = ("whole nodes" if is_whole_node(cluster)
             else f"{plan.gpus_per_node} of {cluster.gpus_per_node} GPUs on a shared node")
    return f"{text} for the requested walltime ({share})"


def planned_attention(cfg: LauncherConfig) -> str:
    """The attention the memory plan counted (``launcher.plan.fit.strategy_fits``: flash on every GPU device)."""
    from launcher.plan.fit import planner_assumes_flash

    if cfg.cluster is not None and planner_assumes_flash(cfg.cluster.device):
        return "flash (assumed by the memory plan; the preflight checks it on the GPUs)"
    return "eager/sdpa math (CPU: the memory plan counts the a*s^2 attention scores)"


def local_summary(cfg: LauncherConfig, nproc: int, run_dir: str) -> str:
    rows = [("where", "this machine (no +cluster)"), ("processes", str(nproc))]
    return _table(rows + _training_rows(cfg, nproc) + [("run dir", run_dir)])


def _training_rows(cfg: LauncherConfig, world_size: int = 1) -> list[tuple[str, str]]:
    from launcher.hub import resolved

    train = cfg.train
    # A Hub id was resolved to its pinned snapshot (launcher.hub): which one, and what the login node found in it.
    snapshots = (resolved("model.pretrained", cfg.model.pretrained), resolved("model.tokenizer", cfg.model.tokenizer))
    hub = [("hub", snapshot.describe()) for snapshot in snapshots if snapshot is not None]
    return [
        ("model", f"{cfg.model.name}" + (f" from {cfg.model.pretrained}" if cfg.model.pretrained else "")),
        *hub,
        ("strategy", f"{cfg.strategy.name}, peft {cfg.peft.name}"),
        ("data", f"{cfg.data.path} ({cfg.data.format or 'auto'})"),
        ("steps", (f"train.epochs={train.epochs} x steps per epoch" if train.epochs else f"{train.max_steps}")
                  + f" x micro-batch {train.micro_batch_size} x accum {train.grad_accum} x seq {train.seq_len}"),
        *_cache_rows(cfg, world_size),
    ]


def _cache_rows(cfg: LauncherConfig, world_size: int) -> list[tuple[str, str]]:
    """Rows and tokens per source and steps per epoch, when the tokenized cache exists (or train.epochs asks)."""
    from launcher.prepare.caches import summary_lines

    lines = summary_lines(cfg, world_size)
    if not cfg.train.epochs and not any("rows" in line for line in lines):
        return []
    return [("cache", line) for line in lines]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key:<{width}}  {value}" for key, value in rows)
