# --- launcher: common setup (runs in the batch shell, outside any container) ---
# Placeholders (at-sign + braces) are filled with shell-quoted values by launcher/slurm/render.py.
export LAUNCHER_RUN_DIR=@{run_dir}
mkdir -p "$LAUNCHER_RUN_DIR/@{logs_dir}"
# Attempts count over the run's life: a requeue keeps the job id, a resubmission around a bad node does not.
LAUNCHER_ATTEMPT=$(( $(grep -c ' started ' "$LAUNCHER_RUN_DIR/@{attempts_log}" 2>/dev/null) + 1 ))
export LAUNCHER_ATTEMPT
export LAUNCHER_MAX_REQUEUES=@{max_requeues}
export LAUNCHER_MAX_NODE_EXCLUSIONS=@{max_node_exclusions}
# The training warns when a save (plus a step in flight) would not fit in this lead time.
export LAUNCHER_SIGNAL_LEAD_S=@{signal_lead_s}
# When this attempt ends: the job keeps its collective timeout below what is left (docs/hangs.md).
launcher_end=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'EndTime=[0-9][^ ]*' | cut -d = -f 2)
LAUNCHER_JOB_END_EPOCH=$( [ -n "$launcher_end" ] && date -d "$launcher_end" +%s 2>/dev/null || echo 0)
export LAUNCHER_JOB_END_EPOCH
# Rendezvous: Slurm tools exist only out here, not inside the container.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
# A port derived from the job id: two jobs sharing a node never collide.
export MASTER_PORT=$(( @{master_port_base} + SLURM_JOB_ID % @{master_port_span} ))
rm -f "$LAUNCHER_RUN_DIR/@{requeue_marker}"
echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} on ${SLURM_JOB_NODELIST} (rendezvous ${MASTER_ADDR}:${MASTER_PORT})"
echo "launcher: job ${SLURM_JOB_ID} attempt ${LAUNCHER_ATTEMPT} started $(date -Is) on ${SLURM_JOB_NODELIST}" >> "$LAUNCHER_RUN_DIR/@{attempts_log}"
