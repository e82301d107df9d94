#!/bin/bash

# Parameters
#SBATCH --account=project_465000123
#SBATCH --cpus-per-task=7
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=tiny-zero2-none
#SBATCH --mem-per-gpu=60G
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=/scratch/project_465000123/runs/tiny-zero2-none/slurm/%j_0_log.out
#SBATCH --partition=dev-g
#SBATCH --requeue
#SBATCH --signal=USR2@600
#SBATCH --time=60

# setup
# --- launcher: common setup (runs in the batch shell, outside any container) ---
# Placeholders (at-sign + braces) are filled with shell-quoted values by launcher/render.py.
export LAUNCHER_RUN_DIR=/scratch/project_465000123/runs/tiny-zero2-none
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
export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3
export NCCL_NET_GDR_LEVEL=PHB
export CXI_FORK_SAFE=1
export CXI_FORK_SAFE_HP=1
export FI_CXI_DISABLE_CQ_HUGETLB=1
export FI_CXI_DEFAULT_CQ_SIZE=131072
export GPU_MAX_HW_QUEUES=8
export OMP_NUM_THREADS=7
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export WANDB_MODE=offline
export TORCH_NCCL_TRACE_BUFFER_SIZE=2000
export TORCH_NCCL_DUMP_ON_TIMEOUT=1
# --- LUMI-G: node-local MIOpen cache (never on Lustre: a shared SQLite cache corrupts), one per job ---
export MIOPEN_USER_DB_PATH="/tmp/${USER:-$(whoami)}-miopen-cache-${SLURM_JOB_ID}"
export MIOPEN_CUSTOM_CACHE_DIR="$MIOPEN_USER_DB_PATH"
# Created once per node, before the training tasks start; the marker says this job made it (lumi_teardown.sh).
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c '[ -d "$1" ] || { mkdir -p "$1" && touch "$1/.created-by-job"; }' _ "$MIOPEN_USER_DB_PATH"
# Hugging Face caches on scratch, never $HOME (20 GB): cluster.hf_home, where the login node resolved the Hub ids.
# Bound into the container by cluster.container.binds.
export HF_HOME=/scratch/project_465000123/.cache/huggingface
# DeepSpeed's JIT-built ops (e.g. CPU Adam for offload) on node-local /tmp, one directory per job: a shared directory
# has one lock for every rank of every node, and a build killed by a time limit leaves a stale lock that hangs later jobs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/${USER:-$(whoami)}-torch-extensions-${SLURM_JOB_ID}}"
# --- container: the job's environment goes in by name; values stay in the environment (launcher/container.py) ---
for launcher_var in MASTER_ADDR MASTER_PORT LAUNCHER_RUN_DIR LAUNCHER_ATTEMPT LAUNCHER_MAX_REQUEUES \
     LAUNCHER_SIGNAL_LEAD_S HF_HOME HF_HUB_CACHE HF_DATASETS_CACHE TORCH_HOME TORCH_EXTENSIONS_DIR \
     TRITON_CACHE_DIR MIOPEN_USER_DB_PATH MIOPEN_CUSTOM_CACHE_DIR HF_HUB_OFFLINE HF_DATASETS_OFFLINE \
     TRANSFORMERS_OFFLINE WANDB_MODE HF_TOKEN WANDB_API_KEY NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_SOCKET_IFNAME \
     NCCL_NET_GDR_LEVEL CXI_FORK_SAFE CXI_FORK_SAFE_HP FI_CXI_DISABLE_CQ_HUGETLB FI_CXI_DEFAULT_CQ_SIZE \
     GPU_MAX_HW_QUEUES OMP_NUM_THREADS TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT; do
  if [ -n "${!launcher_var+x}" ]; then export "SINGULARITYENV_${launcher_var}=${!launcher_var}"; fi
done
unset launcher_var
# $HF_HOME must be visible inside: bound unless a configured bind covers it
if [ -n "${HF_HOME:-}" ]; then
  mkdir -p "$HF_HOME"
  case "$HF_HOME" in
    *,*|*:*) echo "launcher: HF_HOME=$HF_HOME cannot be bound (comma or colon)" >&2 ;;
    /var/spool/slurmd|/var/spool/slurmd/*|/opt/cray|/opt/cray/*|/usr/lib64/libcxi.so.1|/usr/lib64/libcxi.so.1/*|/usr/lib64/libjansson.so.4|/usr/lib64/libjansson.so.4/*|/pfs|/pfs/*|/scratch|/scratch/*|/projappl|/projappl/*|/project|/project/*|/flash|/flash/*|/appl|/appl/*) ;;
    *) export SINGULARITY_BIND="${SINGULARITY_BIND:+$SINGULARITY_BIND,}$HF_HOME" ;;
  esac
fi

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /scratch/project_465000123/runs/tiny-zero2-none/slurm/%j_%t_log.out --kill-on-bad-exit=1 --cpus-per-task=7 --cpu-bind=mask_cpu:0x00fe000000000000,0xfe00000000000000,0x0000000000fe0000,0x00000000fe000000,0x00000000000000fe,0x000000000000fe00,0x000000fe00000000,0x0000fe0000000000 singularity exec --bind /var/spool/slurmd,/opt/cray,/usr/lib64/libcxi.so.1,/usr/lib64/libjansson.so.4,/pfs,/scratch,/projappl,/project,/flash,/appl,/opt/launcher-src --env PYTHONPATH=/opt/launcher-src /project/project_465000123/containers/launcher-lumi.sif python -u -m submitit.core._submit /scratch/project_465000123/runs/tiny-zero2-none/slurm


# teardown
launcher_rc=$?
# --- LUMI-G: remove this job's node-local MIOpen cache on every node, only where this job created it ---
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c '[ -f "$1/.created-by-job" ] && rm -rf "$1"; true' _ "$MIOPEN_USER_DB_PATH" || true
(exit "$launcher_rc")
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