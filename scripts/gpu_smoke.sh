#!/usr/bin/env bash
# GPU smoke test: every strategy trains the tiny model for a few bf16 steps on this machine's GPUs, and each one's
# losses are compared with an fp32 run on the CPU (docs/training.md, "GPU smoke test").
#
#   scripts/gpu_smoke.sh                  # on a GPU machine or the first real allocation (2 ranks, or 1 with one GPU)
#   scripts/gpu_smoke.sh zero3 fsdp       # only these strategies (default: ddp zero1 zero2 zero3 fsdp)
#   scripts/gpu_smoke.sh --dry            # CPU only (CI): the same runs in fp32 on 2 gloo ranks, 2 steps
#
# Environment: PYTHON (default: the active virtualenv's python, else ./.venv/bin/python, else python3);
# GPU_SMOKE_DRY=1 (= --dry); GPU_SMOKE_OUT (a new, empty folder for the runs; default: a new one under ${TMPDIR:-/tmp});
# GPU_SMOKE_STEPS (5; dry 2); GPU_SMOKE_RTOL (2e-2; dry 1e-4); GPU_SMOKE_NPROC (ranks; default 2, or 1 with one GPU);
# GPU_SMOKE_TIMEOUT (seconds per run, 600).
# Exit status: 0 every strategy passed, 1 one failed (the table says which and why), 2 bad usage or no GPU.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

DRY=${GPU_SMOKE_DRY:-0}
STRATEGIES=()
for arg in "$@"; do
    case "$arg" in
        --dry) DRY=1 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        ddp|zero1|zero2|zero3|fsdp) STRATEGIES+=("$arg") ;;
        *) echo "gpu_smoke: unknown argument '$arg' (strategies: ddp zero1 zero2 zero3 fsdp; or --dry)" >&2; exit 2 ;;
    esac
done
[ "$DRY" = 1 ] || [ "$DRY" = true ] && DRY=1 || DRY=0

if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON=python
    elif [ -x "$REPO/.venv/bin/python" ]; then
        PYTHON="$REPO/.venv/bin/python"
        # As activation does: DeepSpeed's JIT build runs the first ninja on PATH, and a different ninja than the one
        # the cached op was built with (the tests run activated) rebuilds it, 30 s or more, every time.
        PATH="$REPO/.venv/bin:$PATH"
    else PYTHON=python3
    fi
fi

if [ "$DRY" = 1 ]; then
    # CPU in CI (2 cores): the three families (DDP, DeepSpeed ZeRO, FSDP) keep it under a minute.
    [ ${#STRATEGIES[@]} -gt 0 ] || STRATEGIES=(ddp zero3 fsdp)
    STEPS=${GPU_SMOKE_STEPS:-2}
    RTOL=${GPU_SMOKE_RTOL:-1e-4}   # fp32 against fp32: the strategies agree to ~1e-7 (tests/test_train_strategies.py)
    PRECISION=fp32
    DEVICE=cpu
else
    [ ${#STRATEGIES[@]} -gt 0 ] || STRATEGIES=(ddp zero1 zero2 zero3 fsdp)
    STEPS=${GPU_SMOKE_STEPS:-5}
    RTOL=${GPU_SMOKE_RTOL:-2e-2}   # bf16 against fp32 on the first steps (measured: ~1e-3 on CPU bf16)
    PRECISION=bf16
    DEVICE=cuda
fi
OUT=${GPU_SMOKE_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke.XXXXXX")}
LOGS="$OUT/logs"
mkdir -p "$LOGS" || exit 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
    # A dry run is a CPU run even on a GPU machine.
    export CUDA_VISIBLE_DEVICES= HIP_VISIBLE_DEVICES= DS_ACCELERATOR=cpu
fi

echo "== gpu_smoke: $([ "$DRY" = 1 ] && echo "DRY (CPU, fp32)" || echo "GPU (bf16)"), output in $OUT"
"$PYTHON" - "$LOGS/gpu_count" <<'EOF'
import importlib.metadata as md, platform, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
import torch
runtime = f"rocm {torch.version.hip}" if getattr(torch.version, "hip", None) else (
    f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu build")
print(f"python {platform.python_version()}, torch {torch.__version__} ({runtime}), deepspeed {version('deepspeed')}, "
      f"transformers {version('transformers')}, peft {version('peft')}, accelerate {version('accelerate')}")
count = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"torch.cuda.is_available() {torch.cuda.is_available()}, {count} device(s)"
      + (f", bf16 {torch.cuda.is_bf16_supported()}" if count else ""))
for i in range(count):
    p = torch.cuda.get_device_properties(i)
    arch = getattr(p, "gcnArchName", "") or f"sm_{p.major}{p.minor}"
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}, {p.total_memory / 2**30:.1f} GiB, {arch}")
open(sys.argv[1], "w").write(f"{count}\n")
EOF
[ $? -eq 0 ] || { echo "gpu_smoke: FAIL: $PYTHON cannot import torch (activate the training environment)"; exit 2; }
if [ "$DRY" != 1 ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/  nvidia-smi: /'
    fi
    if command -v rocm-smi >/dev/null 2>&1; then
        rocm-smi --showproductname 2>&1 | grep -E "GPU\[|Card" | sed 's/^/  rocm-smi: /'
    fi
fi

GPUS=$(cat "$LOGS/gpu_count" 2>/dev/null || echo 0)
if [ "$DRY" = 1 ]; then
    NPROC=${GPU_SMOKE_NPROC:-2}
elif [ "$GPUS" -lt 1 ]; then
    echo "gpu_smoke: FAIL: torch sees no GPU here (check CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES and the job's GPU"
    echo "request); scripts/gpu_smoke.sh --dry runs the same check on the CPU"
    exit 2
elif [ -n "${GPU_SMOKE_NPROC:-}" ]; then
    NPROC=$GPU_SMOKE_NPROC
elif [ "$GPUS" -ge 2 ]; then
    NPROC=2
else
    NPROC=1
    echo "gpu_smoke: only one GPU is visible: 1 rank per run (no gradient all-reduce or sharding across ranks is"
    echo "exercised; use a machine with 2 GPUs for that)"
fi
echo "gpu_smoke: ${STRATEGIES[*]} on $NPROC rank(s), $STEPS steps, $PRECISION on $DEVICE, against an fp32 CPU" \
     "reference on $NPROC rank(s); relative tolerance $RTOL"

# The same model, data and batches for every run; GQA (4 query heads on 2 key/value heads) as in Llama 3 and Mistral.
COMMON=(model=tiny model.num_kv_heads=2 data=corpus "train.max_steps=$STEPS" train.log_every=1 train.export=false
        train.tensorboard=false)
TIMEOUT=${GPU_SMOKE_TIMEOUT:-600}
TIMEOUT_CMD=()
command -v timeout >/dev/null 2>&1 && TIMEOUT_CMD=(timeout --kill-after=30 "$TIMEOUT")

run_one() {  # NAME STRATEGY PRECISION [cpu]: one local run through the launcher, its log, exit code and seconds
    local name=$1 strategy=$2 precision=$3 where=${4:-}
    local start end code
    rm -rf "${OUT:?}/smoke-$name"  # a run directory that exists would be resumed
    start=$(date +%s.%N)
    (
        if [ "$where" = cpu ]; then export CUDA_VISIBLE_DEVICES= HIP_VISIBLE_DEVICES= DS_ACCELERATOR=cpu; fi
        "${TIMEOUT_CMD[@]}" "$PYTHON" -m launcher "nproc_per_node=$NPROC" "output_dir=$OUT" "run_name=smoke-$name" \
            "strategy=$strategy" "strategy.precision=$precision" "${COMMON[@]}"
    ) >"$LOGS/smoke-$name.log" 2>&1
    code=$?
    end=$(date +%s.%N)
    echo "$code" >"$LOGS/smoke-$name.rc"
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f\n", b - a }' >"$LOGS/smoke-$name.time"
    echo "gpu_smoke: $name ($strategy, $precision$([ "$where" = cpu ] && echo ", CPU")): exit $code in" \
         "$(cat "$LOGS/smoke-$name.time")s, log $LOGS/smoke-$name.log"
}

# DeepSpeed builds its CPU shared-memory op on first use: once here, so that two ranks never race to build it.
if [ "$DRY" = 1 ] && [[ " ${STRATEGIES[*]} " == *" zero"* ]]; then
    "$PYTHON" -c "
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder('ShareMemCommBuilder')
builder is None or builder.load(verbose=False)" >"$LOGS/deepspeed_op.log" 2>&1 \
        || echo "gpu_smoke: building DeepSpeed's CPU op failed (see $LOGS/deepspeed_op.log); the zero* runs may fail too"
fi

# Every run reads the same data: a shared tokenized cache, and the tokenizer the reference run trained (the runs after
# it skip training a tokenizer and tokenizing).
COMMON+=("data.cache_dir=$OUT/cache")
# The dry run checks the strategies' numbers; the preflight checks a GPU allocation, of which a CPU has none.
[ "$DRY" = 1 ] && COMMON+=(train.preflight=false)
run_one reference ddp fp32 cpu
[ -d "$OUT/smoke-reference/tokenizer" ] && COMMON+=("model.tokenizer=$OUT/smoke-reference/tokenizer")
for strategy in "${STRATEGIES[@]}"; do
    run_one "$strategy" "$strategy" "$PRECISION"
done

echo "== gpu_smoke: results"
"$PYTHON" "$REPO/scripts/gpu_smoke_compare.py" "$OUT" "${STRATEGIES[@]}" --steps "$STEPS" --rtol "$RTOL" \
    --device "$DEVICE" --precision "$PRECISION" --reference-precision fp32
