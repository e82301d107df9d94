# --- Leonardo Booster: Hugging Face caches on $WORK/$FAST, never $HOME (50 GB) ---
export HF_HOME="${HF_HOME:-${WORK:-$HOME}/.cache/huggingface}"
