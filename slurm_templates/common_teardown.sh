# --- launcher: requeue (outside the container, after every task has exited) ---
launcher_rc=$?
if [ -f "$LAUNCHER_RUN_DIR/@{requeue_marker}" ]; then
  rm -f "$LAUNCHER_RUN_DIR/@{requeue_marker}"
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$LAUNCHER_MAX_REQUEUES" ]; then
    echo "launcher: checkpoint saved after a stop signal; requeueing job ${SLURM_JOB_ID} (attempt ${LAUNCHER_ATTEMPT} of at most $(( LAUNCHER_MAX_REQUEUES + 1 )))"
    echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} requeued $(date -Is)" >> "$LAUNCHER_RUN_DIR/@{attempts_log}"
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
