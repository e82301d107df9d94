# --- Leonardo Booster: Hugging Face caches on $WORK, never $HOME (50 GB) ---
# cluster.hf_home: where the login node resolved the Hub ids.
export HF_HOME=@{hf_home}
# DeepSpeed's JIT-built ops (e.g. CPU Adam for offload) on node-local /tmp, one directory per job: a shared directory
# has one lock for every rank of every node, and a build killed by a time limit leaves a stale lock that hangs later jobs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/${USER:-$(whoami)}-torch-extensions-${SLURM_JOB_ID}}"
