#!/bin/bash

# Parameters
#SBATCH --account=EUHPC_D35_189
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1
#SBATCH --job-name=tiny-ddp-none
#SBATCH --mem-per-gpu=120G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/leonardo_work/EUHPC_D35_189/runs/tiny-ddp-none/slurm/%j_0_log.out
#SBATCH --partition=boost_usr_prod
#SBATCH --qos=normal
#SBATCH --requeue
#SBATCH --signal=USR2@600
#SBATCH --time=60

# setup
# --- launcher: common setup (runs in the batch shell, outside any container) ---
# Placeholders (at-sign + braces) are filled with shell-quoted values by launcher/render.py.
export LAUNCHER_RUN_DIR=/leonardo_work/EUHPC_D35_189/runs/tiny-ddp-none
export LAUNCHER_ATTEMPT=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))
export LAUNCHER_MAX_REQUEUES=5
# The training warns when a save (plus a step in flight) would not fit in this lead time.
export LAUNCHER_SIGNAL_LEAD_S=600
# Rendezvous: Slurm tools exist only out here, not inside the container.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
# A port derived from the job id: two jobs sharing a node never collide.
export MASTER_PORT=$(( 10000 + SLURM_JOB_ID % 10000 ))
mkdir -p "$LAUNCHER_RUN_DIR/logs"
rm -f "$LAUNCHER_RUN_DIR/.requeue_requested"
echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} on ${SLURM_JOB_NODELIST} (rendezvous ${MASTER_ADDR}:${MASTER_PORT})"
echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} started $(date -Is) on ${SLURM_JOB_NODELIST}" >> "$LAUNCHER_RUN_DIR/logs/attempts.log"
# --- cluster.env ---
export NCCL_IB_TIMEOUT=23
export OMP_NUM_THREADS=8
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export WANDB_MODE=offline
export TORCH_NCCL_TRACE_BUFFER_SIZE=2000
export TORCH_NCCL_DUMP_ON_TIMEOUT=1
# --- Leonardo Booster: Hugging Face caches on $WORK, never $HOME (50 GB) ---
# cluster.hf_home: where the login node resolved the Hub ids.
export HF_HOME=/leonardo_work/EUHPC_D35_189/.cache/huggingface
# DeepSpeed's JIT-built ops (e.g. CPU Adam for offload) on node-local /tmp, one directory per job: a shared directory
# has one lock for every rank of every node, and a build killed by a time limit leaves a stale lock that hangs later jobs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/${USER:-$(whoami)}-torch-extensions-${SLURM_JOB_ID}}"
# --- container: the job's environment goes in by name; values stay in the environment (launcher/container.py) ---
for launcher_var in MASTER_ADDR MASTER_PORT LAUNCHER_RUN_DIR LAUNCHER_ATTEMPT LAUNCHER_MAX_REQUEUES \
     LAUNCHER_SIGNAL_LEAD_S HF_HOME HF_HUB_CACHE HF_DATASETS_CACHE TORCH_HOME TORCH_EXTENSIONS_DIR \
     TRITON_CACHE_DIR MIOPEN_USER_DB_PATH MIOPEN_CUSTOM_CACHE_DIR HF_HUB_OFFLINE HF_DATASETS_OFFLINE \
     TRANSFORMERS_OFFLINE WANDB_MODE HF_TOKEN WANDB_API_KEY NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_IB_TIMEOUT \
     OMP_NUM_THREADS TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT; do
  if [ -n "${!launcher_var+x}" ]; then export "SINGULARITYENV_${launcher_var}=${!launcher_var}"; fi
done
unset launcher_var
# $HF_HOME must be visible inside: bound unless a configured bind covers it
if [ -n "${HF_HOME:-}" ]; then
  mkdir -p "$HF_HOME"
  case "$HF_HOME" in
    *,*|*:*) echo "launcher: HF_HOME=$HF_HOME cannot be bound (comma or colon)" >&2 ;;
    /leonardo_scratch|/leonardo_scratch/*|/leonardo|/leonardo/*|/leonardo_work|/leonardo_work/*) ;;
    *) export SINGULARITY_BIND="${SINGULARITY_BIND:+$SINGULARITY_BIND,}$HF_HOME" ;;
  esac
fi

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /leonardo_work/EUHPC_D35_189/runs/tiny-ddp-none/slurm/%j_%t_log.out --kill-on-bad-exit=1 --cpus-per-task=8 --cpu-bind=cores singularity exec --nv --bind /leonardo_scratch,/leonardo,/leonardo_work,/opt/launcher-src --env PYTHONPATH=/opt/launcher-src /leonardo_work/EUHPC_D35_189/l.sif python -u -m submitit.core._submit /leonardo_work/EUHPC_D35_189/runs/tiny-ddp-none/slurm


# teardown
# --- launcher: requeue (outside the container, after every task has exited) ---
launcher_rc=$?
if [ -f "$LAUNCHER_RUN_DIR/.requeue_requested" ]; then
  rm -f "$LAUNCHER_RUN_DIR/.requeue_requested"
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$LAUNCHER_MAX_REQUEUES" ]; then
    echo "launcher: checkpoint saved after a stop signal; requeueing job ${SLURM_JOB_ID} (attempt ${LAUNCHER_ATTEMPT} of at most $(( LAUNCHER_MAX_REQUEUES + 1 )))"
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} requeued $(date -Is)" >> "$LAUNCHER_RUN_DIR/logs/attempts.log"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    echo "launcher: scontrol requeue failed; the checkpoint is saved: resubmit the same command to continue" >&2
    exit 1
  fi
  echo "launcher: checkpoint saved, but the requeue cap (cluster.max_requeues=${LAUNCHER_MAX_REQUEUES}) is reached; resubmit the same command to continue" >&2
  exit 1
fi
exit "$launcher_rc"