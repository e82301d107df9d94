# --- launcher: common setup (runs in the batch shell, outside any container) ---
# Placeholders (at-sign + braces) are filled with shell-quoted values by launcher/render.py.
export LAUNCHER_RUN_DIR=@{run_dir}
export LAUNCHER_ATTEMPT=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))
export LAUNCHER_MAX_REQUEUES=@{max_requeues}
# The training warns when a save (plus a step in flight) would not fit in this lead time.
export LAUNCHER_SIGNAL_LEAD_S=@{signal_lead_s}
# Rendezvous: Slurm tools exist only out here, not inside the container.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
# A port derived from the job id: two jobs sharing a node never collide.
export MASTER_PORT=$(( @{master_port_base} + SLURM_JOB_ID % @{master_port_span} ))
mkdir -p "$LAUNCHER_RUN_DIR/@{logs_dir}"
rm -f "$LAUNCHER_RUN_DIR/@{requeue_marker}"
echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} on ${SLURM_JOB_NODELIST} (rendezvous ${MASTER_ADDR}:${MASTER_PORT})"
echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} started $(date -Is) on ${SLURM_JOB_NODELIST}" >> "$LAUNCHER_RUN_DIR/@{attempts_log}"
