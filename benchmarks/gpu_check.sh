#!/usr/bin/env bash
# The GPU checks of issues #3 and #4, prepared to run in one go on a lent GPU machine (a few minutes on an H200):
#   1. training through torchrun with 1 GPU (NCCL DDP), channels_last, on synthetic 224x224 data:
#      AMP bf16, AMP fp16 (GradScaler), and bf16 with torch.compile;
#   2. `mobilenetv3 bench` on the GPU: eager, channels-last, AMP bf16/fp16 engines, ours against torchvision and
#      timm side by side, inference at batch 1/32/256 and training (CUDA events); then the compile engine at 256;
#   3. issue #27, real JPEGs: 4096 photo-like 500x375 JPEGs (benchmarks/jpeg_loader.py's), the loader alone
#      (`mobilenetv3 bench-loader`) and end-to-end training images/s (the last of 3 epochs) with data.decode=cpu
#      and data.decode=gpu, beside the same training on synthetic data (the GPU's own pace).
# Each step runs even if an earlier one failed, under its own time limit (steps 1-2 take ~8 min on an H200, step 3
# ~5 min); the last line says which failed.  STEPS (a bash regex, default: every step) picks steps by name:
# STEPS='jpeg|loader' runs step 3 alone.
# Results in $OUT: log.txt, bench.txt and bench-compile.txt (tables), train-<name>.jsonl (metrics per epoch),
# loader-<decode>.json (bench-loader's JSON line) and jpeg-summary.txt (images/s: synthetic, cpu, gpu decode).
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
STEPS=${STEPS:-.}
step() {  # step NAME SECONDS COMMAND...: run under a time limit, time it, and record a failure without stopping
    local name=$1 limit=$2; shift 2
    [[ $name =~ $STEPS ]] || return 0
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

JPEGS=runs/gpu-check-jpegs
jpegs() {  # the JPEG folder, written once (16 processes)
    [[ -d $JPEGS/train ]] || "$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from jpeg_loader import write_folder; write_folder(Path('$JPEGS'), 4096, classes=8, processes=16)"
}

loader() {  # loader DECODE: bench-loader on the JPEG folder, 12 workers, batch 256
    "$PYTHON" -m mobilenetv3 bench-loader --data "$JPEGS" --batch-size 256 --batches 40 --workers 12 \
        --set "data.decode=$1" --json | tee "$OUT/loader-$1.txt" && tail -n 1 "$OUT/loader-$1.txt" > "$OUT/loader-$1.json"
}

train_images() {  # train_images NAME DATA EXTRA_ARGS...: 3 epochs of Large, bf16, channels_last, 12 workers
    local name=$1 data=$2; shift 2
    local run="runs/gpu-check-$name"
    rm -rf "$run" "$run.log"
    "$PYTHON" -m mobilenetv3 train --data "$data" --model mobilenetv3_large_100 --input-size 224 --batch-size 256 \
        --epochs 3 --workers 12 --channels-last --amp bf16 --set data.synthetic_train_samples=4096 \
        --set data.synthetic_val_samples=256 --set data.synthetic_classes=8 --output "$run" "$@" 2>&1 \
        | tee "$run.log" && cp "$run/metrics.jsonl" "$OUT/train-$name.jsonl" \
    && echo "$name $(tail -n 1 "$run/metrics.jsonl" | "$PYTHON" -c 'import json, sys; print(round(json.load(sys.stdin)["train_images_per_s"]))') images/s (last epoch)" \
        | tee -a "$OUT/jpeg-summary.txt"
}

export -f train bench jpegs loader train_images
export PYTHON OUT JPEGS
step train-bf16 120 train bf16 --amp bf16
step train-fp16 120 train fp16 --amp fp16
step bench 180 bench bench.txt --engines eager,channels-last,amp-bf16,amp-fp16 --batch-size 1 32 256 --train
step train-bf16-compile 150 train bf16-compile --amp bf16 --compile
step bench-compile 150 bench bench-compile.txt --engines compile --batch-size 256
step jpegs 120 jpegs
step loader-cpu 90 loader cpu
step loader-gpu 90 loader gpu
step train-jpeg-synthetic 120 train_images jpeg-synthetic synthetic
step train-jpeg-cpu 150 train_images jpeg-cpu "$JPEGS" --set data.decode=cpu
step train-jpeg-gpu 150 train_images jpeg-gpu "$JPEGS" --set data.decode=gpu

if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all GPU checks passed"
