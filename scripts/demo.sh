#!/usr/bin/env bash
# `make demo`: 6-13 minutes on 2 CPU cores, depending on the CPU (docs/history.md).
#   1. profile: params and MACs of every variant beside the paper's numbers
#   2. train the fashion-mnist recipe for DEMO_EPOCHS epochs (default 4: >= 90% test accuracy)
#   3. evaluate the best checkpoint (it reproduces the logged validation numbers)
#   4. the curves are in $OUT/curves.png; 5. predict a few Fashion-MNIST test images saved as PNG
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${DEMO_OUTPUT:-runs/demo}
EPOCHS=${DEMO_EPOCHS:-4}

$PY -m mobilenetv3 profile

rm -rf "$OUT"
$PY -m mobilenetv3 train --recipe fashion-mnist --epochs "$EPOCHS" --output "$OUT"
$PY -m mobilenetv3 eval --checkpoint "$OUT/checkpoints/best.pt" --data fashion-mnist
echo "curves: $OUT/curves.png   metrics: $OUT/metrics.jsonl, $OUT/metrics.csv   TensorBoard: $OUT/tensorboard"

# A few test images as PNG files named after their true class, then classify them.
$PY - "$OUT/samples" <<'PYTHON'
import sys
from pathlib import Path

from PIL import Image

from mobilenetv3.data import fashion_mnist

folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
images, labels = fashion_mnist.load_split(fashion_mnist.locate(), "test")
for index in range(8):
    name = fashion_mnist.CLASS_NAMES[int(labels[index])].replace("/", "-").replace(" ", "_")
    Image.fromarray(images[index, 0].numpy(), mode="L").save(folder / f"test{index}_{name}.png")
print(f"saved 8 test images to {folder}")
PYTHON
$PY -m mobilenetv3 predict --checkpoint "$OUT/checkpoints/best.pt" --topk 3 "$OUT/samples"
