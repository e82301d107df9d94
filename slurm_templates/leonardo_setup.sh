# --- Leonardo Booster: Hugging Face caches on $WORK/$FAST, never $HOME (50 GB) ---
export HF_HOME="${HF_HOME:-${WORK:-$HOME}/.cache/huggingface}"
# DeepSpeed's JIT-built ops (e.g. CPU Adam for offload) go beside it, not into $HOME.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${HF_HOME%/huggingface}/torch_extensions}"
