#!/bin/bash

# Parameters
#SBATCH --account=project_465000123
#SBATCH --cpus-per-task=7
#SBATCH --gpus-per-node=1
#SBATCH --job-name=tiny-ddp-none
#SBATCH --mem-per-gpu=60G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/project_465000123/runs/tiny-ddp-none/slurm/%j_0_log.out
#SBATCH --partition=small-g
#SBATCH --requeue
#SBATCH --signal=USR2@600
#SBATCH --time=60

# setup
# --- launcher: common setup (runs in the batch shell, outside any container) ---
# Placeholders (at-sign + braces) are filled with shell-quoted values by launcher/slurm/render.py.
export LAUNCHER_RUN_DIR=/scratch/project_465000123/runs/tiny-ddp-none
mkdir -p "$LAUNCHER_RUN_DIR/logs"
# Attempts count over the run's life: a requeue keeps the job id, a resubmission around a bad node does not.
LAUNCHER_ATTEMPT=$(( $(grep -c ' started ' "$LAUNCHER_RUN_DIR/logs/attempts.log" 2>/dev/null) + 1 ))
export LAUNCHER_ATTEMPT
export LAUNCHER_MAX_REQUEUES=5
export LAUNCHER_MAX_NODE_EXCLUSIONS=2
# The training warns when a save (plus a step in flight) would not fit in this lead time.
export LAUNCHER_SIGNAL_LEAD_S=600
# When this attempt ends: the job keeps its collective timeout below what is left (docs/hangs.md).
launcher_end=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'EndTime=[0-9][^ ]*' | cut -d = -f 2)
LAUNCHER_JOB_END_EPOCH=$( [ -n "$launcher_end" ] && date -d "$launcher_end" +%s 2>/dev/null || echo 0)
export LAUNCHER_JOB_END_EPOCH
# Rendezvous: Slurm tools exist only out here, not inside the container.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
# A port derived from the job id: two jobs sharing a node never collide.
export MASTER_PORT=$(( 10000 + SLURM_JOB_ID % 10000 ))
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
     LAUNCHER_MAX_NODE_EXCLUSIONS LAUNCHER_SIGNAL_LEAD_S LAUNCHER_JOB_END_EPOCH HF_HOME HF_HUB_CACHE \
     HF_DATASETS_CACHE TORCH_HOME TORCH_EXTENSIONS_DIR TRITON_CACHE_DIR MIOPEN_USER_DB_PATH \
     MIOPEN_CUSTOM_CACHE_DIR HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE WANDB_MODE HF_TOKEN \
     WANDB_API_KEY MLFLOW_TRACKING_TOKEN MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD NCCL_DEBUG \
     NCCL_DEBUG_SUBSYS NCCL_SOCKET_IFNAME NCCL_NET_GDR_LEVEL CXI_FORK_SAFE CXI_FORK_SAFE_HP \
     FI_CXI_DISABLE_CQ_HUGETLB FI_CXI_DEFAULT_CQ_SIZE GPU_MAX_HW_QUEUES OMP_NUM_THREADS \
     TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT; do
  if [ -n "${!launcher_var+x}" ]; then export "SINGULARITYENV_${launcher_var}=${!launcher_var}"; fi
done
unset launcher_var
# $HF_HOME must be visible inside: bound unless a configured bind covers it
if [ -n "${HF_HOME:-}" ]; then
  mkdir -p "$HF_HOME"
  case "$HF_HOME" in
    *,*|*:*) echo "launcher: HF_HOME=$HF_HOME cannot be bound (comma or colon)" >&2 ;;
    /var/spool/slurmd|/var/spool/slurmd/*|/opt/cray|/opt/cray/*|/usr/lib64/libcxi.so.1|/usr/lib64/libcxi.so.1/*|/usr/lib64/libjansson.so.4|/usr/lib64/libjansson.so.4/*|/pfs|/pfs/*|/scratch|/scratch/*|/projappl|/projappl/*|/project|/project/*|/flash|/flash/*|/appl|/appl/*) ;;
    *) case ",${SINGULARITY_BIND:-}," in *",$HF_HOME,"*) ;; *) export SINGULARITY_BIND="${SINGULARITY_BIND:+$SINGULARITY_BIND,}$HF_HOME" ;; esac ;;
  esac
fi

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /scratch/project_465000123/runs/tiny-ddp-none/slurm/%j_%t_log.out --kill-on-bad-exit=1 --cpus-per-task=7 --cpu-bind=cores singularity exec --bind /var/spool/slurmd,/opt/cray,/usr/lib64/libcxi.so.1,/usr/lib64/libjansson.so.4,/pfs,/scratch,/projappl,/project,/flash,/appl,/opt/launcher-src --env PYTHONPATH=/opt/launcher-src /project/project_465000123/containers/launcher-lumi.sif python -u -m submitit.core._submit /scratch/project_465000123/runs/tiny-ddp-none/slurm


# teardown
launcher_rc=$?
# --- LUMI-G: remove this job's node-local MIOpen cache on every node, only where this job created it ---
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c '[ -f "$1/.created-by-job" ] && rm -rf "$1"; true' _ "$MIOPEN_USER_DB_PATH" || true
(exit "$launcher_rc")
# --- launcher: requeue (outside the container, after every task has exited) ---
launcher_rc=$?
launcher_log="$LAUNCHER_RUN_DIR/logs/attempts.log"
if [ -f "$LAUNCHER_RUN_DIR/.requeue_requested" ]; then
  rm -f "$LAUNCHER_RUN_DIR/.requeue_requested"
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$LAUNCHER_MAX_REQUEUES" ]; then
    echo "launcher: checkpoint saved after a stop signal; requeueing job ${SLURM_JOB_ID} (attempt ${LAUNCHER_ATTEMPT} of at most $(( LAUNCHER_MAX_REQUEUES + 1 )))"
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} requeued $(date -Is)" >> "$launcher_log"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    echo "launcher: scontrol requeue failed; the checkpoint is saved: resubmit the same command to continue" >&2
    exit 1
  fi
  echo "launcher: checkpoint saved, but the requeue cap (cluster.max_requeues=${LAUNCHER_MAX_REQUEUES}) is reached; resubmit the same command to continue" >&2
  exit 1
fi
# --- launcher: around a fault (a hang, exit 5; a failed preflight, exit 4; docs/hangs.md) ---
# Slurm cannot change the excluded nodes of a running job and a requeue lands on the same node, so a fault that names
# a node resubmits this script without it (the same run directory: it resumes from the newest checkpoint).
launcher_fault_dir="$LAUNCHER_RUN_DIR/hangs/attempt-${LAUNCHER_ATTEMPT}"
if [ "$launcher_rc" -eq 5 ] || [ "$launcher_rc" -eq 4 ]; then
  launcher_node=$(head -n 1 "$launcher_fault_dir/node" 2>/dev/null)
  launcher_reason=$(head -n 1 "$launcher_fault_dir/reason" 2>/dev/null)
  launcher_reason=${launcher_reason:-no node named (stacks in $launcher_fault_dir)}
  launcher_excluded=$(grep -c . "$LAUNCHER_RUN_DIR/logs/excluded_nodes" 2>/dev/null)
  if [ -n "$launcher_node" ] && [ "${launcher_excluded:-0}" -ge "$LAUNCHER_MAX_NODE_EXCLUSIONS" ]; then
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} failed on ${launcher_node} (${launcher_reason}); not resubmitted: ${launcher_excluded} node(s) already excluded, the cap (cluster.max_node_exclusions=${LAUNCHER_MAX_NODE_EXCLUSIONS}) is reached" | tee -a "$launcher_log" >&2
    exit "$launcher_rc"
  fi
  if [ -n "$launcher_node" ]; then
    echo "$launcher_node $launcher_reason" >> "$LAUNCHER_RUN_DIR/logs/excluded_nodes"
    launcher_exclude=$(cut -d ' ' -f 1 "$LAUNCHER_RUN_DIR/logs/excluded_nodes" | sort -u | paste -sd , -)
    launcher_previous=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'ExcNodeList=[^ ]*' | cut -d = -f 2)
    case "$launcher_previous" in ""|"(null)") ;; *) launcher_exclude="$launcher_previous,$launcher_exclude" ;; esac
  elif grep -q ' hang-requeued ' "$launcher_log" 2>/dev/null || [ "$launcher_rc" -ne 5 ]; then
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} failed (exit ${launcher_rc}): ${launcher_reason}; not requeued: no node explains it and it already happened once" | tee -a "$launcher_log" >&2
    exit "$launcher_rc"
  else
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} hang-requeued $(date -Is): ${launcher_reason}; once, on any node" | tee -a "$launcher_log"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    exit "$launcher_rc"
  fi
  launcher_script="$LAUNCHER_RUN_DIR/slurm/${SLURM_JOB_ID}_resubmit.sh"
  scontrol write batch_script "$SLURM_JOB_ID" "$launcher_script" > /dev/null
  # The new job must not inherit this one's restart count (it would count against cluster.max_requeues).
  launcher_new=$(env -u SLURM_RESTART_COUNT sbatch --parsable --exclude="$launcher_exclude" \
    --dependency="afterany:${SLURM_JOB_ID}" "$launcher_script")
  if [ -z "$launcher_new" ]; then
    echo "launcher: resubmission without ${launcher_node} failed; resubmit the same command with cluster.exclude_nodes=${launcher_exclude}" | tee -a "$launcher_log" >&2
    exit "$launcher_rc"
  fi
  launcher_new=${launcher_new%%;*}
  # submitit's task reads <folder>/<job id>_submitted.pkl: the new job runs the same pickled task.
  cp "$LAUNCHER_RUN_DIR/slurm/${SLURM_JOB_ID}_submitted.pkl" "$LAUNCHER_RUN_DIR/slurm/${launcher_new}_submitted.pkl"
  echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} excluded ${launcher_node} $(date -Is): ${launcher_reason}; resubmitted as job ${launcher_new} with --exclude=${launcher_exclude}" | tee -a "$launcher_log"
  exit "$launcher_rc"
fi
exit "$launcher_rc"