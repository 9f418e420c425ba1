#!/usr/bin/env bash
# The GPU checks of issues #3 and #4, prepared to run in one go on a lent GPU machine (a few minutes on an H200):
#   1. training through torchrun with 1 GPU (NCCL DDP), channels_last, on synthetic 224x224 data:
#      AMP bf16, AMP fp16 (GradScaler), and bf16 with torch.compile;
#   2. `mobilenetv3 bench` on the GPU: eager, channels-last, AMP bf16/fp16 engines, ours against torchvision and
#      timm side by side, inference at batch 1/32/256 and training (CUDA events); then the compile engine at 256.
# Each step runs even if an earlier one failed, under its own time limit (the whole script stays under ~8 min
# on an H200, the device tool's budget); the last line says which failed.
# Results in $OUT: log.txt, bench.txt and bench-compile.txt (tables), train-<name>.jsonl (metrics per epoch).
#
#     OUT=runs/gpu-check bash benchmarks/gpu_check.sh            # uses `python3`, or $PYTHON
#
# Runs from the repository root without installing: PYTHONPATH=src.  Exits 3 when no CUDA GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/log.txt") 2>&1

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "no CUDA GPU visible to $PYTHON: nothing to check"
    exit 3
fi
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

failed=()
step() {  # step NAME SECONDS COMMAND...: run under a time limit, time it, and record a failure without stopping
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    local started=$SECONDS
    if timeout -k 30 "$limit" bash -o pipefail -c '"$@"' "$name" "$@"; then echo "== $name: ok in $((SECONDS - started)) s"
    else echo "== $name: FAILED (exit $?) after $((SECONDS - started)) s"; failed+=("$name"); fi
}

train() {  # train NAME EXTRA_ARGS...: 2 short epochs of Large on synthetic data, 1 GPU under torchrun (NCCL DDP)
    local name=$1; shift
    local run="runs/gpu-check-$name"
    rm -rf "$run" "$run.log"  # metrics.jsonl is appended to: start clean
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m mobilenetv3 train --data synthetic \
        --model mobilenetv3_large_100 --input-size 224 --batch-size 256 --epochs 2 --workers 4 --channels-last \
        --set data.synthetic_train_samples=8192 --set data.synthetic_val_samples=1024 \
        --set data.synthetic_classes=1000 --output "$run" "$@" 2>&1 | tee "$run.log" \
    && grep -q "backend nccl" "$run.log" && cp "$run/metrics.jsonl" "$OUT/train-$name.jsonl"
}

bench() {  # bench FILE ARGS...: ours against torchvision and timm, CUDA-event timing
    local file=$1; shift
    "$PYTHON" -m mobilenetv3 bench --model mobilenetv3_large_100 --compare torchvision,timm --min-time 0.5 "$@" \
        | tee "$OUT/$file"
}

export -f train bench
export PYTHON OUT
step train-bf16 120 train bf16 --amp bf16
step train-fp16 120 train fp16 --amp fp16
step bench 180 bench bench.txt --engines eager,channels-last,amp-bf16,amp-fp16 --batch-size 1 32 256 --train
step train-bf16-compile 150 train bf16-compile --amp bf16 --compile
step bench-compile 150 bench bench-compile.txt --engines compile --batch-size 256

if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all GPU checks passed"
