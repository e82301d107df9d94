# --- launcher: requeue (outside the container, after every task has exited) ---
launcher_rc=$?
launcher_log="$LAUNCHER_RUN_DIR/@{attempts_log}"
if [ -f "$LAUNCHER_RUN_DIR/@{requeue_marker}" ]; then
  rm -f "$LAUNCHER_RUN_DIR/@{requeue_marker}"
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
# --- launcher: around a fault (a hang, exit @{exit_hang}; a failed preflight, exit @{exit_preflight}; docs/hangs.md) ---
# Slurm cannot change the excluded nodes of a running job and a requeue lands on the same node, so a fault that names
# a node resubmits this script without it (the same run directory: it resumes from the newest checkpoint).
launcher_fault_dir="$LAUNCHER_RUN_DIR/@{hangs_dir}/attempt-${LAUNCHER_ATTEMPT}"
if [ "$launcher_rc" -eq @{exit_hang} ] || [ "$launcher_rc" -eq @{exit_preflight} ]; then
  launcher_node=$(head -n 1 "$launcher_fault_dir/@{hang_node_file}" 2>/dev/null)
  launcher_reason=$(head -n 1 "$launcher_fault_dir/@{hang_reason_file}" 2>/dev/null)
  launcher_reason=${launcher_reason:-no node named (stacks in $launcher_fault_dir)}
  launcher_excluded=$(grep -c . "$LAUNCHER_RUN_DIR/@{excluded_nodes}" 2>/dev/null)
  if [ -n "$launcher_node" ] && [ "${launcher_excluded:-0}" -ge "$LAUNCHER_MAX_NODE_EXCLUSIONS" ]; then
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} failed on ${launcher_node} (${launcher_reason}); not resubmitted: ${launcher_excluded} node(s) already excluded, the cap (cluster.max_node_exclusions=${LAUNCHER_MAX_NODE_EXCLUSIONS}) is reached" | tee -a "$launcher_log" >&2
    exit "$launcher_rc"
  fi
  if [ -n "$launcher_node" ]; then
    echo "$launcher_node $launcher_reason" >> "$LAUNCHER_RUN_DIR/@{excluded_nodes}"
    launcher_exclude=$(cut -d ' ' -f 1 "$LAUNCHER_RUN_DIR/@{excluded_nodes}" | sort -u | paste -sd , -)
    launcher_previous=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'ExcNodeList=[^ ]*' | cut -d = -f 2)
    case "$launcher_previous" in ""|"(null)") ;; *) launcher_exclude="$launcher_previous,$launcher_exclude" ;; esac
  elif grep -q ' hang-requeued ' "$launcher_log" 2>/dev/null || [ "$launcher_rc" -ne @{exit_hang} ]; then
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} failed (exit ${launcher_rc}): ${launcher_reason}; not requeued: no node explains it and it already happened once" | tee -a "$launcher_log" >&2
    exit "$launcher_rc"
  else
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} hang-requeued $(date -Is): ${launcher_reason}; once, on any node" | tee -a "$launcher_log"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    exit "$launcher_rc"
  fi
  launcher_script="$LAUNCHER_RUN_DIR/@{slurm_dir}/${SLURM_JOB_ID}_resubmit.sh"
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
  cp "$LAUNCHER_RUN_DIR/@{slurm_dir}/${SLURM_JOB_ID}_submitted.pkl" "$LAUNCHER_RUN_DIR/@{slurm_dir}/${launcher_new}_submitted.pkl"
  echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} excluded ${launcher_node} $(date -Is): ${launcher_reason}; resubmitted as job ${launcher_new} with --exclude=${launcher_exclude}" | tee -a "$launcher_log"
  exit "$launcher_rc"
fi
exit "$launcher_rc"
