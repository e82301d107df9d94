"""THE run-directory contract: ``<output_dir>/<run_name>/`` and every name, marker and exit code in it.

Imported by every side (login node, job, status, scaling report) and rendered into the shell templates
(``TEMPLATE_VALUES``), so each fact has this one definition. Stdlib only at import.

    <run_dir>/
      config.yaml                 the resolved config the job reads back (written atomically)
      job.sh                      the batch script (also printed by dry runs)
      metrics.jsonl               one JSON object per line: train steps, eval, checkpoint events
      checkpoints/step-<N>/       one checkpoint; complete only once COMPLETE (with its file manifest) exists;
      checkpoints/step-<N>.tmp/   being written (renamed when complete)
      export/                     the Hugging Face model (or LoRA adapter) at the end; export/merged/: merged LoRA
      eval/                       launcher.evaluate's results (<name>.json) and their table (README.md)
      generations.jsonl           launcher.generate's prompt -> completion records
      logs/attempts.log           one line per attempt start / requeue (written by the batch script)
      logs/attempt-<N>.log        rank 0's output of attempt N
      slurm/                      submitit's folder: <job>_<task>_log.out|err, <job>_submitted.pkl, ...
      .requeue_requested          rank 0 saved after a stop signal: the batch script requeues the job
      preflight.json, environment.json, tokenizer/, tensorboard/, .sync/
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

CONFIG_FILE = "config.yaml"
SCRIPT_FILE = "job.sh"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
STEP_DIR_RE = re.compile(r"^step-(\d+)$")
TMP_SUFFIX = ".tmp"
EXPORT_DIR = "export"
# Inside the export of a LoRA run: the adapter merged into a standalone model (peft.merge_on_export=true, or
# python -m launcher.export RUN_DIR --merge). Inside, not beside: a new export replaces it, so it is never stale.
MERGED_DIR = "merged"
# python -m launcher.evaluate RUN_DIR: <run_dir>/eval/<name>.json per evaluation and eval/README.md (the table).
EVAL_DIR = "eval"
EVAL_TABLE = "README.md"
# The follow-up evaluation job's submitit folder (train.evaluate_after): not slurm/, whose jobs are the training's.
EVAL_SLURM_DIR = f"{EVAL_DIR}/slurm"
# python -m launcher.generate RUN_DIR: prompt -> completion records (JSON Lines), appended.
GENERATIONS_FILE = "generations.jsonl"
LOGS_DIR = "logs"
ATTEMPTS_LOG = f"{LOGS_DIR}/attempts.log"
# Nodes the batch script resubmitted the job without (one "host reason" line each; docs/hangs.md).
EXCLUDED_NODES_FILE = f"{LOGS_DIR}/excluded_nodes"
SLURM_DIR = "slurm"
REQUEUE_MARKER = ".requeue_requested"
PREFLIGHT_FILE = "preflight.json"
PREFLIGHT_DIR = "preflight"
FINGERPRINT_FILE = "environment.json"
TOKENIZER_DIR = "tokenizer"
TENSORBOARD_DIR = "tensorboard"
# Experiment trackers (launcher/train/trackers.py, docs/tracking.md).
WANDB_DIR = "wandb"  # wandb.init(dir=<run_dir>) writes <run_dir>/wandb/offline-run-<time>-<id>/
WANDB_OFFLINE_GLOB = "offline-run-*"
MLFLOW_DIR = "mlruns"  # the default file store
TRACKERS_FILE = "trackers.json"  # the tracker run ids that requeued attempts continue
SYNC_DIR = ".sync"
RUN_MARKERS = (CONFIG_FILE, SCRIPT_FILE, SLURM_DIR, METRICS_FILE, ATTEMPTS_LOG)

# Exit codes of ``python -m launcher.train`` (and of every rank).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_REQUEUE = 3  # a stop signal came, every rank saved: the batch script requeues
EXIT_PREFLIGHT = 4

# Variables the batch script exports (slurm_templates/common_setup.sh) and the job reads.
ENV_RUN_DIR = "LAUNCHER_RUN_DIR"
ENV_ATTEMPT = "LAUNCHER_ATTEMPT"
ENV_MAX_REQUEUES = "LAUNCHER_MAX_REQUEUES"
ENV_SIGNAL_LEAD_S = "LAUNCHER_SIGNAL_LEAD_S"
ENV_MAX_EXCLUSIONS = "LAUNCHER_MAX_NODE_EXCLUSIONS"
ENV_JOB_END = "LAUNCHER_JOB_END_EPOCH"  # when Slurm ends this attempt (seconds since the epoch; 0: unknown)

# Rendezvous port from the job id: two jobs sharing a node never collide, and it stays below the ephemeral range.
MASTER_PORT_BASE = 10000
MASTER_PORT_SPAN = 10000

# What the shell templates get for their @{...} placeholders besides the per-run values (all shell-safe words).
TEMPLATE_VALUES: Dict[str, str] = {
    "requeue_marker": REQUEUE_MARKER,
    "logs_dir": LOGS_DIR,
    "attempts_log": ATTEMPTS_LOG,
    "excluded_nodes": EXCLUDED_NODES_FILE,
    "slurm_dir": SLURM_DIR,
    "master_port_base": str(MASTER_PORT_BASE),
    "master_port_span": str(MASTER_PORT_SPAN),
}


def master_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job (the batch script computes the same in shell)."""
    return MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN


def run_dir(output_dir: str, run_name: str) -> Path:
    """<output_dir>/<run_name>, absolute: the job may start in another directory."""
    return Path(output_dir).expanduser().absolute() / run_name


def read_excluded_nodes(run: Path) -> List[str]:
    """The hosts the batch script excluded after a fault of this run (first word of each line), in order."""
    try:
        lines = (Path(run) / EXCLUDED_NODES_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.split()[0] for line in lines if line.strip()]


def attempt_number(environ: Optional[Mapping[str, str]] = None) -> int:
    """This attempt's number: the batch script's LAUNCHER_ATTEMPT (counted over the run's life), else Slurm's restart
    count + 1, else 1."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get(ENV_ATTEMPT) or int(env.get("SLURM_RESTART_COUNT", "0")) + 1)
    except ValueError:
        return 1


def attempt_log(run: Path, attempt: int | str) -> Path:
    return Path(run) / LOGS_DIR / f"attempt-{attempt}.log"


def task_log(run: Path, job_id: str, task: int = 0, ext: str = "out") -> Path:
    """submitit's log of one task of one job."""
    return Path(run) / SLURM_DIR / f"{job_id}_{task}_log.{ext}"


def is_regular_file(path: Path) -> bool:
    """A plain file (never a FIFO, device or directory: opening those could block or mislead a reader)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / marker).exists() for marker in RUN_MARKERS)


# -- writing ----------------------------------------------------------------------------------------------------


def write_config(run: Path, cfg: Any) -> Path:
    """Write the resolved config atomically (a job may be reading the previous one). ``cfg``: a dataclass of the
    schema, a DictConfig or a plain mapping."""
    from omegaconf import OmegaConf

    run.mkdir(parents=True, exist_ok=True)
    path = run / CONFIG_FILE
    tmp = path.with_name(path.name + TMP_SUFFIX)
    node = OmegaConf.structured(cfg) if not isinstance(cfg, Mapping) else OmegaConf.create(dict(cfg))
    tmp.write_text(OmegaConf.to_yaml(node, resolve=True))
    tmp.replace(path)
    return path


def write_script(run: Path, script: str, name: str = SCRIPT_FILE) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / name
    path.write_text(script)
    return path


# -- reading (never fails on one bad line or file) ------------------------------------------------------------------


def parse_metrics_line(line: str | bytes) -> Optional[Dict[str, Any]]:
    """One metrics.jsonl record, or None for a blank, cut (crash mid-write) or non-object line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def iter_metrics(path: Path) -> Iterator[Dict[str, Any]]:
    """Every readable record of a metrics file, in order; nothing when the file is absent."""
    if not is_regular_file(path):
        return
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return
    with handle:
        for line in handle:
            record = parse_metrics_line(line)
            if record is not None:
                yield record


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    return list(iter_metrics(path))


def read_metrics_tail(path: Path, block: int = 64 * 1024) -> Dict[str, Any]:
    """The last train record (with "loss") and last eval_loss of metrics.jsonl, reading only the file's tail."""
    if not is_regular_file(path):
        return {}
    try:
        handle = open(path, "rb")
    except OSError:
        return {}
    with handle:
        size = os.fstat(handle.fileno()).st_size
        result: Dict[str, Any] = {}
        read = min(size, block)
        while True:
            handle.seek(size - read)
            lines = handle.read(read).split(b"\n")
            if read < size:
                lines = lines[1:]  # the first line may be cut
            for record in filter(None, map(parse_metrics_line, reversed(lines))):
                if "eval_loss" in record and "eval_loss" not in result:
                    result["eval_loss"] = record["eval_loss"]
                if "loss" in record and "train" not in result:
                    result["train"] = record
                if "train" in result and "eval_loss" in result:
                    return result
            if read >= size:
                return result
            read = min(size, read * 8)


def last_complete_step(run: Path) -> Optional[int]:
    """Step of the newest checkpoint with its COMPLETE marker (the job also verifies the manifest; this cheap check
    only looks for the marker)."""
    steps = []
    try:
        for entry in os.scandir(Path(run) / CHECKPOINTS_DIR):
            match = STEP_DIR_RE.match(entry.name)
            if match and os.path.exists(os.path.join(entry.path, COMPLETE_MARKER)):
                steps.append(int(match.group(1)))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return max(steps) if steps else None


# -- hangs and faulty nodes (launcher/train/watchdog.py, slurm_templates/common_teardown.sh; docs/hangs.md) ---------
# Appended: <run_dir>/hangs/attempt-<N>/rank-<r>.txt (stacks), node (the host to exclude), reason (why).
HANGS_DIR = "hangs"
HANG_NODE_FILE = "node"
HANG_REASON_FILE = "reason"
EXIT_HANG = 5  # the step-progress watchdog fired: the batch script requeues, excluding the node when one is named
TEMPLATE_VALUES.update({
    "hangs_dir": HANGS_DIR,
    "hang_node_file": HANG_NODE_FILE,
    "hang_reason_file": HANG_REASON_FILE,
    "exit_hang": str(EXIT_HANG),
    "exit_preflight": str(EXIT_PREFLIGHT),
})


def hang_dir(run: Path, attempt: int | str) -> Path:
    """<run_dir>/hangs/attempt-<N>: what the watchdog (and a failed preflight) of attempt N left."""
    return Path(run) / HANGS_DIR / f"attempt-{attempt}"
