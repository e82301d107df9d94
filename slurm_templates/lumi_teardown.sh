# --- LUMI-G: remove this job's node-local MIOpen cache on every node, only where this job created it ---
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c '[ -f "$1/.created-by-job" ] && rm -rf "$1"; true' _ "$MIOPEN_USER_DB_PATH" || true
