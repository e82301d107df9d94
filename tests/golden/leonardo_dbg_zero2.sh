#!/bin/bash

# Parameters
#SBATCH --account=EUHPC_D35_189
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --gpus-per-node=4
#SBATCH --job-name=tiny-zero2-none
#SBATCH --mem=480G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/leonardo_work/EUHPC_D35_189/runs/tiny-zero2-none/slurm/%j_0_log.out
#SBATCH --partition=boost_usr_prod
#SBATCH --qos=boost_qos_dbg
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --time=20

# setup
# --- launcher: common setup (runs in the batch shell, outside any container) ---
# Placeholders (at-sign + braces) are filled with shell-quoted values by launcher/slurm/render.py.
export LAUNCHER_RUN_DIR=/leonardo_work/EUHPC_D35_189/runs/tiny-zero2-none
mkdir -p "$LAUNCHER_RUN_DIR/logs"
# Attempts count over the run's life: a requeue keeps the job id, a resubmission around a bad node does not.
LAUNCHER_ATTEMPT=$(( $(grep -c ' started ' "$LAUNCHER_RUN_DIR/logs/attempts.log" 2>/dev/null) + 1 ))
export LAUNCHER_ATTEMPT
export LAUNCHER_MAX_REQUEUES=5
export LAUNCHER_MAX_NODE_EXCLUSIONS=2
# The training warns when a save (plus a step in flight) would not fit in this lead time.
export LAUNCHER_SIGNAL_LEAD_S=300
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
     LAUNCHER_MAX_NODE_EXCLUSIONS LAUNCHER_SIGNAL_LEAD_S LAUNCHER_JOB_END_EPOCH HF_HOME HF_HUB_CACHE \
     HF_DATASETS_CACHE TORCH_HOME TORCH_EXTENSIONS_DIR TRITON_CACHE_DIR MIOPEN_USER_DB_PATH \
     MIOPEN_CUSTOM_CACHE_DIR HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE WANDB_MODE HF_TOKEN \
     WANDB_API_KEY MLFLOW_TRACKING_TOKEN MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD NCCL_DEBUG \
     NCCL_DEBUG_SUBSYS NCCL_IB_TIMEOUT OMP_NUM_THREADS TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT; do
  if [ -n "${!launcher_var+x}" ]; then export "SINGULARITYENV_${launcher_var}=${!launcher_var}"; fi
done
unset launcher_var
# $HF_HOME must be visible inside: bound unless a configured bind covers it
if [ -n "${HF_HOME:-}" ]; then
  mkdir -p "$HF_HOME"
  case "$HF_HOME" in
    *,*|*:*) echo "launcher: HF_HOME=$HF_HOME cannot be bound (comma or colon)" >&2 ;;
    /leonardo_scratch|/leonardo_scratch/*|/leonardo|/leonardo/*|/leonardo_work|/leonardo_work/*) ;;
    *) case ",${SINGULARITY_BIND:-}," in *",$HF_HOME,"*) ;; *) export SINGULARITY_BIND="${SINGULARITY_BIND:+$SINGULARITY_BIND,}$HF_HOME" ;; esac ;;
  esac
fi

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /leonardo_work/EUHPC_D35_189/runs/tiny-zero2-none/slurm/%j_%t_log.out --kill-on-bad-exit=1 --cpus-per-task=8 --cpu-bind=cores singularity exec --nv --bind /leonardo_scratch,/leonardo,/leonardo_work,/opt/launcher-src --env PYTHONPATH=/opt/launcher-src /leonardo_work/EUHPC_D35_189/l.sif python -u -m submitit.core._submit /leonardo_work/EUHPC_D35_189/runs/tiny-zero2-none/slurm


# teardown
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