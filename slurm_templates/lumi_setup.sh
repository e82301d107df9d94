# --- LUMI-G: node-local MIOpen cache (never on Lustre: a shared SQLite cache corrupts), one per job ---
export MIOPEN_USER_DB_PATH="/tmp/${USER:-$(whoami)}-miopen-cache-${SLURM_JOB_ID}"
export MIOPEN_CUSTOM_CACHE_DIR="$MIOPEN_USER_DB_PATH"
# Created once per node, before the training tasks start; the marker says this job made it (lumi_teardown.sh).
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c '[ -d "$1" ] || { mkdir -p "$1" && touch "$1/.created-by-job"; }' _ "$MIOPEN_USER_DB_PATH"
# Hugging Face caches on scratch, never $HOME (20 GB): cluster.hf_home, where the login node resolved the Hub ids.
# Bound into the container by cluster.container.binds.
export HF_HOME=@{hf_home}
# DeepSpeed's JIT-built ops (e.g. CPU Adam for offload) on node-local /tmp, one directory per job: a shared directory
# has one lock for every rank of every node, and a build killed by a time limit leaves a stale lock that hangs later jobs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/${USER:-$(whoami)}-torch-extensions-${SLURM_JOB_ID}}"
