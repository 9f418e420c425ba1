"""The export check of issue 22, before and after: which inputs, which reference, which verdict.

The model is the one that made `predict` end in `ExportVerificationError`: torchvision's mobilenet_v3_large
with random weights (`--seed`) and BatchNorm statistics measured on smooth photo-like images (what a model
trained on real images has), converted with the IMAGENET1K_V1 preprocessing.  Its ONNX export (BN folded)
is run by ONNX Runtime on three kinds of input, and each row prints (the run is appended to
benchmarks/results/export_verification.jsonl):

  max |out|       the float64 model's largest logit;
  eager32 err     max |float32 eager - float64|: float32's own rounding on those inputs;
  onnx err        max |ONNX Runtime - float64|;
  old rule        max |ONNX - float32 eager| <= 1e-4 x max(1, max |out|)  (the check before issue 22);
  new rule        onnx err <= max(4 x eager32 err, 1e-4 x max(1, max |out|))  (deploy/export.py).

    .venv/bin/python benchmarks/export_verification.py [--seed 2] [--images 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

import results  # benchmarks/results.py: this script's folder is on sys.path

from mobilenetv3.timing import calibrate_batchnorm
from mobilenetv3.deploy.export import (DEFAULT_TOLERANCE, ExportFormat, _example_input, compare_outputs,
                                       export_model, load_artifact, verification_inputs)
from mobilenetv3.deploy.predict import find_images, load_samples
from mobilenetv3.weights.convert import convert_state_dict
from mobilenetv3.weights.io import load_model, save_model


def smooth_images(folder: Path, count: int) -> list[Path]:
    """Smooth random colour fields saved as JPEG: a coarse grid of random colours, resized bicubically."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, (rng.integers(2, 9), rng.integers(2, 9), 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((320, 240), Image.Resampling.BICUBIC).save(folder / f"{index:03d}.jpg",
                                                                                    quality=95)
    return find_images([folder])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=2, help="torch seed of the random weights (default 2)")
    parser.add_argument("--images", type=int, default=32, help="images that set the BN statistics (default 32)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = smooth_images(work / "images", args.images)
        torch.manual_seed(args.seed)
        peer = torchvision.models.mobilenet_v3_large()
        converted = convert_state_dict("torchvision", "mobilenet_v3_large.IMAGENET1K_V1", peer.state_dict())
        preprocessing = converted.preprocessing
        batch = torch.from_numpy(load_samples(paths, preprocessing, len(paths)))
        calibrated = calibrate_batchnorm(peer, batch)
        converted = convert_state_dict("torchvision", "mobilenet_v3_large.IMAGENET1K_V1", calibrated.state_dict())
        weights = save_model(converted.build(), work / "large.safetensors", preprocessing=preprocessing)
        model = load_model(weights).eval()

        export_model(model, work / "large.onnx", ExportFormat.ONNX)  # passes the new check, or raises
        onnx = load_artifact(work / "large.onnx", ExportFormat.ONNX)
        inputs = {
            "randn (the old check's inputs)": [_example_input(3, 224, 1, 1), _example_input(3, 224, 3, 2)],
            "random fields (the new default)": verification_inputs(preprocessing, 224, (1, 3)),
            "4 of the images (as predict does)": verification_inputs(preprocessing, 224, (1, 3), batch[:4].numpy()),
        }
        print(f"torchvision mobilenet_v3_large, seed {args.seed}, BN statistics from {args.images} smooth JPEGs; "
              "its ONNX export (BN folded) in ONNX Runtime")
        print(f"{'inputs':36s} {'max |out|':>9s} {'eager32 err':>11s} {'onnx err':>9s} {'onnx-eager32':>12s} "
              f"{'old rule':>17s} {'new rule':>17s}")
        rows = []
        for name, batches in inputs.items():
            comparison = compare_outputs(model, onnx, batches)
            with torch.inference_mode():
                old_diff = max(float(np.abs(onnx(x.numpy()) - model(x).numpy()).max()) for x in batches)
            old_allowed = DEFAULT_TOLERANCE * max(1.0, comparison.scale)
            new_allowed = comparison.allowed(DEFAULT_TOLERANCE)
            old = f"{'pass' if old_diff <= old_allowed else 'FAIL'} (<= {old_allowed:.3g})"
            new = f"{'pass' if comparison.passes(DEFAULT_TOLERANCE) else 'FAIL'} (<= {new_allowed:.3g})"
            print(f"{name:36s} {comparison.scale:9.3g} {comparison.eager_diff:11.3g} {comparison.artifact_diff:9.3g} "
                  f"{old_diff:12.3g} {old:>17s} {new:>17s}")
            rows.append({"inputs": name, "scale": comparison.scale, "eager_diff": comparison.eager_diff,
                         "artifact_diff": comparison.artifact_diff, "old_diff": old_diff, "old_allowed": old_allowed,
                         "old_pass": old_diff <= old_allowed, "new_allowed": new_allowed,
                         "new_pass": comparison.passes(DEFAULT_TOLERANCE)})
    results.record("export_verification", {"seed": args.seed, "images": args.images, "rows": rows}, argv=sys.argv)


if __name__ == "__main__":
    main()
