"""Typed schema of the whole config tree.

Registered with Hydra's ConfigStore as ``base_config``; ``conf/config.yaml`` lists it first in its defaults,
so every YAML value is type-checked and a misspelled key fails at composition with the key's full name.
Value checks that need more than a type (allowed names, limits) live in ``launcher.config.validation``.

This module is imported on the login node: stdlib and omegaconf only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

PEFT_METHODS = ("none", "lora", "qlora")
# What train.trackers may name (each is also the package the job imports; docs/tracking.md).
TRACKERS = ("tensorboard", "wandb", "mlflow")
DATA_FORMATS = ("text", "jsonl_text", "instruction", "chat")
TASKS = ("causal_lm", "classification")


@dataclass
class PartitionLimits:
    """What one Slurm partition (or QOS) allows a single job."""

    max_nodes: int = 1
    max_time: str = "01:00:00"  # Slurm time format: [D-]HH:MM:SS
    min_nodes: int = 1
    # Whole nodes only (LUMI standard-g): billing counts full nodes whatever is asked.
    exclusive: bool = False
    # Billing units per node-hour on this partition; None uses the cluster's own rule.
    billing_per_node_hour: Optional[float] = None


@dataclass
class ContainerConfig:
    """An Apptainer/Singularity image that runs every task (see docs/containers.md)."""

    image: str = MISSING
    runtime: str = "singularity"  # the executable on the compute node: singularity or apptainer
    gpu_flag: Optional[str] = None  # --rocm (LUMI) or --nv (Leonardo)
    binds: List[str] = field(default_factory=list)
    # Lines run inside the container before python (e.g. activating a conda env in older LUMI images).
    python: str = "python"


@dataclass
class ClusterConfig:
    """A machine profile: data in ``conf/cluster/*.yaml``, never code."""

    name: str = MISSING
    account: Optional[str] = None
    # A regular expression the account must match (LUMI: project_<9 digits>).
    account_pattern: str = ".+"
    account_required: bool = True
    partition: str = MISSING
    qos: Optional[str] = None
    time: str = "01:00:00"
    partitions: Dict[str, PartitionLimits] = field(default_factory=dict)
    qos_limits: Dict[str, PartitionLimits] = field(default_factory=dict)
    # Hardware of one node.
    device: str = "cpu"  # a key of launcher.plan.devices.DEVICES
    gpus_per_node: int = 0
    cpus_per_node: int = 1
    # What the job asks for.
    gpus_per_node_requested: Optional[int] = None  # None: all of them
    tasks_per_node: Optional[int] = None  # None: one per requested GPU (at least 1)
    cpus_per_task: int = 1
    mem: Optional[str] = None  # e.g. 480G: what a whole-node job asks for; None leaves Slurm's default
    mem_per_gpu: Optional[str] = None  # what a partial-node job asks for per GPU (a whole node without ``mem`` too)
    # Host memory one node gives a job, in Slurm's G (GiB): the planner's host budget is the job's request (mem, or
    # mem_per_gpu x GPUs) capped by this (launcher.plan.host). None: only the request, else host memory is not checked.
    host_mem_gb: Optional[float] = None
    # None: follow the request (whole nodes are exclusive, a share of a shareable partition is not); true/false force.
    exclusive: Optional[bool] = None
    cpu_bind: Optional[str] = None  # srun --cpu-bind value
    gpu_bind: Optional[str] = None  # srun --gpu-bind value
    # Per-task device selection variable (LUMI: ROCR_VISIBLE_DEVICES). None: trust Slurm's own binding.
    visible_devices_var: Optional[str] = None
    backend: str = "gloo"  # torch.distributed backend: nccl (CUDA and ROCm) or gloo (CPU)
    # Billing: "gpu_hours" (LUMI: one GPU-hour = one MI250X module = 2 GCDs), "node_hours" or "core_hours".
    billing_unit: str = "node_hours"
    gpus_per_billing_gpu: int = 1
    # Shared nodes bill max(GPUs, cores / billing_cores_per_gpu, memory / billing_mem_gb_per_gpu) GPU slots.
    billing_cores_per_gpu: int = 8
    billing_mem_gb_per_gpu: Optional[float] = None
    # Exported in the batch script (outside the container) and so inherited by every task.
    env: Dict[str, str] = field(default_factory=dict)
    # The Hugging Face home the job exports as HF_HOME (its cache is <hf_home>/hub) and the login node resolves Hub
    # ids against (docs/models.md); None: $HF_HOME, else ~/.cache/huggingface, resolved on the login node.
    hf_home: Optional[str] = None
    # Shell template under slurm_templates/ with the machine's own setup lines.
    setup_template: Optional[str] = None
    # Shell template run after the training step, before the requeue decision (cleanup of node-local state).
    teardown_template: Optional[str] = None
    container: Optional[ContainerConfig] = None
    # Python command on the compute node when there is no container; None: the interpreter running the launcher.
    python: Optional[str] = None
    # Seconds between Slurm's warning signal and the time limit: enough to finish a step and save.
    signal_lead_s: int = 300
    max_requeues: int = 5
    # A hang or failed preflight that names a node resubmits the job without it, at most this many nodes per run.
    max_node_exclusions: int = 2
    # Extra #SBATCH options (name without dashes -> value), for what the schema does not cover.
    sbatch_extra: Dict[str, str] = field(default_factory=dict)
    exclude_nodes: Optional[str] = None
    # All-reduce bus bandwidth the preflight expects (GB/s, nccl-tests' definition); None: no bandwidth check.
    expected_busbw_gbps: Optional[float] = None
    # CPU-only partition for `python -m launcher.prepare` jobs (tokenizing); None: the profile's partition.
    cpu_partition: Optional[str] = None
    cpu_partition_cpus: int = 4  # cores a prepare job asks for
    cpu_partition_mem_gb: float = 8.0  # the most memory a prepare job asks for

    @property
    def gpus_requested(self) -> int:
        return requested_gpus(self.gpus_per_node, self.gpus_per_node_requested)

    @property
    def tasks(self) -> int:
        """Tasks (ranks) per node."""
        return tasks_on_node(self.tasks_per_node, self.gpus_requested)


def requested_gpus(gpus_per_node: int, requested: Optional[int]) -> int:
    """GPUs a job asks for on each node: all of them unless ``gpus_per_node_requested`` says otherwise."""
    return gpus_per_node if requested is None else requested


def tasks_on_node(tasks_per_node: Optional[int], gpus: int) -> int:
    """One task per requested GPU (at least one) unless ``tasks_per_node`` is set."""
    return tasks_per_node if tasks_per_node is not None else max(1, gpus)


@dataclass
class ModelConfig:
    """A Hugging Face causal LM: built from these numbers, or loaded from ``pretrained`` (a local directory)."""

    name: str = "tiny"
    arch: str = "llama"  # transformers model_type used when building from the numbers below
    pretrained: Optional[str] = None  # a local directory, or a Hub id org/name[@rev] resolved on the login node (docs/models.md)
    tokenizer: Optional[str] = None  # local directory; default: pretrained dir, else a BPE trained on the data
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    gradient_checkpointing: bool = False


@dataclass
class DataSource:
    """One source of a mixture (``data.sources``): packed data drawn with probability weight / sum of weights."""

    path: str = MISSING  # a local file or directory, as data.path
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "corpus"
    path: str = MISSING  # a local file (or directory of files)
    format: Optional[str] = None  # text | jsonl_text | instruction | chat; None: detected from the file
    eval_fraction: float = 0.05
    # Instruction and chat data: the loss covers only the response tokens unless this is true.
    train_on_prompt: bool = False
    cache_dir: Optional[str] = None  # tokenized cache; None: <output_dir>/.cache/tokenized
    # A mixture of packed sources with weights (docs/data.md); when set it replaces data.path.
    sources: List[DataSource] = field(default_factory=list)
    # Tokenizing processes; None: the cores this process may use (a job's allocation), capped by the CPU count.
    num_workers: Optional[int] = None
    # Before reusing a cache, compare every file's full SHA-256 (the key only hashes size and first/last MiB).
    verify: bool = False
    # A +cluster GPU job whose cache is missing and whose data exceeds this many MB waits for a prepare job.
    prepare_job_above_mb: float = 100.0


@dataclass
class TaskConfig:
    """What the model learns (docs/tasks.md): next-token prediction, or one label per text (``conf/task/*.yaml``)."""

    name: str = "causal_lm"  # one of TASKS
    # Classification records (CSV columns or JSON Lines fields): the text and its label (a string or an integer).
    text_field: str = "text"
    label_field: str = "label"
    # Appended to the default run_name, so that a classification run never resumes a causal-LM run's checkpoints.
    run_name_suffix: str = ""


@dataclass
class StrategyConfig:
    name: str = "ddp"  # a key of launcher.config.strategies.STRATEGIES (its engine, ZeRO stage, sharding)
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32


@dataclass
class PeftConfig:
    name: str = "none"  # none | lora | qlora (a 4-bit NF4 base under the LoRA adapters: docs/models.md)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge_on_export: bool = False


@dataclass
class TrainConfig:
    max_steps: int = 200
    # Passes over the tokenized train split: sets max_steps (exclusive with setting train.max_steps).
    epochs: Optional[int] = None
    micro_batch_size: int = 8
    grad_accum: int = 1
    # Strong scaling: fix the global batch (sequences per optimizer step); grad_accum is then derived per world size.
    global_batch_size: Optional[int] = None
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 1234
    save_every: int = 50  # 0: only on time, at the end and on a stop (local runs only: validation)
    save_every_minutes: Optional[float] = None
    keep_last: int = 2
    keep_every: Optional[int] = None
    # Write checkpoints in the background (ddp, fsdp: DCP async_save; zero* save synchronously): the loop waits only
    # for the copy into host memory. None: on when the job runs on GPUs, off on CPU (docs/checkpoints.md).
    async_save: Optional[bool] = None
    eval_every: int = 50  # 0: no evaluation
    eval_batches: int = 4
    log_every: int = 10  # as conf/training/default.yaml: each log step is a host sync and an all-reduce
    tensorboard: bool = False  # the same as listing tensorboard in trackers (kept for older configs)
    # Experiment trackers, any of TRACKERS, written by rank 0 into the run directory (docs/tracking.md).
    trackers: List[str] = field(default_factory=list)
    tracker_project: str = "eurohpc-launcher"  # the W&B project and the MLflow experiment
    # None: a file store in <run_dir>/mlruns. Credentials come from the environment, never from the config.
    mlflow_tracking_uri: Optional[str] = None
    # Write the Hugging Face model to <run_dir>/export at the end (benchmarks skip it).
    export: bool = True
    # After training: python -m launcher.evaluate on the export (a follow-up Slurm job, --dependency=afterok on the
    # training job, one device; locally right after training). Results in <run_dir>/eval/ (docs/inference.md).
    evaluate_after: bool = False
    # Check devices, CPU binding, bandwidth and the network transport before training (docs/preflight.md).
    preflight: bool = True
    # Sleep this many seconds per step: only for tests of time limits and preemption.
    debug_step_sleep_s: float = 0.0
    # Only for tests: each checkpoint write (ddp, fsdp) sleeps this long after its shards, before DCP's metadata.
    debug_save_sleep_s: float = 0.0
    # Hangs and stragglers (docs/hangs.md). Seconds without a completed optimizer step before the watchdog dumps
    # every rank's stacks and exits with rundir.EXIT_HANG; None: derived (max(600, 20 x median step), more before
    # the first step and in saves); 0: off.
    hang_timeout_s: Optional[float] = None
    # Every this many logged steps the ranks gather their step times (0: never); a rank above straggler_ratio x the
    # median for 3 windows in a row gets a warning.
    straggler_every: int = 10
    straggler_ratio: float = 1.2
    # Only for tests: one rank (None: the last) blocks forever at this step, in a collective or in a sleep.
    debug_hang_at_step: Optional[int] = None
    debug_hang_rank: Optional[int] = None
    debug_hang_in: str = "collective"  # collective | sleep
    debug_hang_attempts: Optional[int] = None  # hang only in attempts 1..N (None: every attempt)
    # Only for tests: this rank sleeps debug_slow_factor x debug_step_sleep_s per step (a straggler).
    debug_slow_rank: Optional[int] = None
    debug_slow_factor: float = 1.0


@dataclass
class BudgetConfig:
    """A full training run's cost, estimated in the dry run from a token target and a throughput."""

    tokens: Optional[float] = None  # e.g. 2e11; None: no budget shown
    # Throughput: a measured tokens/s per device (from a scaling report) wins over the assumed MFU.
    tokens_per_s_per_device: Optional[float] = None
    mfu: float = 0.35


@dataclass
class LauncherConfig:
    dry_run: bool = False
    nodes: int = 1
    nproc_per_node: Optional[int] = None  # local runs: default one per visible GPU, else 1
    run_name: str = MISSING
    output_dir: str = "./runs"
    export_only: bool = False
    # Submit even when the memory estimate says the strategy does not fit a device.
    ignore_memory_estimate: bool = False
    cluster: Optional[ClusterConfig] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


def register_schema() -> None:
    """Make ``base_config`` available to the defaults list (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if "base_config.yaml" not in store.repo:  # storing converts the whole schema again (~40 ms per call)
        store.store(name="base_config", node=LauncherConfig)


def as_container(cfg: Any) -> Dict[str, Any]:
    """A resolved plain-dict copy of a composed config (what the job reads back)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
