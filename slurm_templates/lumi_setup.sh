# --- LUMI-G: node-local MIOpen cache (never on Lustre: a shared SQLite cache corrupts), one per job ---
export MIOPEN_USER_DB_PATH="/tmp/${USER:-$(whoami)}-miopen-cache-${SLURM_JOB_ID}"
export MIOPEN_CUSTOM_CACHE_DIR="$MIOPEN_USER_DB_PATH"
# Created once per node, before the training tasks start.
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 mkdir -p "$MIOPEN_USER_DB_PATH"
# Hugging Face caches on scratch, never $HOME (20 GB). Bound into the container by cluster.container.binds.
export HF_HOME="${HF_HOME:-/scratch/${SLURM_JOB_ACCOUNT}/${USER:-$(whoami)}/.cache/huggingface}"
# DeepSpeed's JIT-built ops (e.g. CPU Adam for offload) go beside it, not into $HOME.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${HF_HOME%/huggingface}/torch_extensions}"
