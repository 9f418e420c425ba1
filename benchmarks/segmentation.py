"""Segmentation on fashion-mnist-seg: train variants of a segmentation recipe one after another, each alone on
the CPU, and record each one's mIoU, pixel accuracy, per-class IoU and wall time; or (--latency) time `predict`
per image with ONNX Runtime fp32 at 128x128 and 512x1024.

Each variant is a name plus `--set` overrides of the recipe, run as its own `mobilenetv3 train` process (in
OUTPUT/NAME) with nothing else started beside it, so the wall times compare.  One record per variant goes to
benchmarks/results/segmentation.jsonl; docs/results.md shows the latest record of each variant.

    # the recipe's own run (the issue's target: >= 70% mIoU within 30 minutes on 2 cores)
    python benchmarks/segmentation.py --variant "large-lraspp"
    # the paper's claim that the head earns its place: the same backbone and schedule with a 1x1-conv head
    python benchmarks/segmentation.py --variant "large-conv1x1 model.head=conv1x1"
    python benchmarks/segmentation.py --variant "small-lraspp model.name=lraspp_mobilenetv3_small_100"
    # predict's latency: LR-ASPP Large, fp32 ONNX Runtime, one image at a time (recorded as segmentation_latency)
    python benchmarks/segmentation.py --latency [--checkpoint runs/seg/checkpoints/best.pt]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import results as recorded  # benchmarks/results.py: this script's folder is on sys.path
from recipe_sweep import parse_variant, train_variant


def run_variant(recipe: str, name: str, overrides: list[str], output: str) -> dict:
    """Train one variant to the end; its results as plain data."""
    run = train_variant(recipe, name, overrides, output)
    rows, wall = run["rows"], run["wall_time_s"]
    last = rows[-1]
    best = max(rows, key=lambda row: row["val_miou"])
    return {
        "variant": name, "overrides": overrides, "recipe": recipe, "model": run["model"], "params": run["params"],
        "epochs": len(rows), "wall_time_s": round(wall, 1),
        "train_time_s": round(sum(row["epoch_time_s"] for row in rows), 1),
        "train_images_per_s": round(sum(row["train_images_per_s"] for row in rows) / len(rows), 1),
        "last_miou": last["val_miou"], "last_pixel_acc": last["val_pixel_acc"], "last_iou": last["val_iou"],
        "best_miou": best["val_miou"], "best_epoch": best["epoch"], "val_samples": last["val_samples"],
        # the minute at which the run first reached 70% mIoU (the issue's target), from the epochs' end times
        "minutes_to_70": _minutes_to(rows, 70.0, wall),
    }


def _minutes_to(rows: list[dict], target: float, wall: float) -> float | None:
    """Train time (plus validation, pro rata of the wall time) until the first epoch at or above `target`."""
    train_total = sum(row["epoch_time_s"] for row in rows)
    elapsed = 0.0
    for row in rows:
        elapsed += row["epoch_time_s"]
        if row["val_miou"] >= target:
            return round(elapsed / train_total * wall / 60.0, 1)
    return None


#: (what it stands for, height, width, in_chans, classes): our canvases, and the paper's Cityscapes half size
LATENCY_SETTINGS = (("fashion-mnist-seg canvas", 128, 128, 1, 11), ("Cityscapes half size", 512, 1024, 3, 19))


def measure_latency(model_name: str, checkpoint: str | None, work: str, images: int, repeats: int) -> list[dict]:
    """Per image, one at a time, with predict's ONNX Runtime engine (a verified fp32 export with a dynamic size):
    the engine call alone (median of `repeats`), and the whole of `predict` (PNG decode, preprocessing, the
    engine, the mask and overlay PNGs written) over `images` files, total / count."""
    import numpy as np
    from PIL import Image

    import mobilenetv3
    from mobilenetv3.deploy.engines import make_engine
    from mobilenetv3.deploy.predict import predict_segmentation_files
    from mobilenetv3.preprocessing import Preprocessing
    from mobilenetv3.timing import percentile

    rows = []
    rng = np.random.default_rng(0)
    for label, height, width, in_chans, classes in LATENCY_SETTINGS:
        folder = os.path.join(work, f"{height}x{width}")
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        weights = os.path.join(folder, "model.safetensors")
        if checkpoint and in_chans == 1:  # the trained canvas model, where one is given
            model = mobilenetv3.load_model(checkpoint)
            weights_source = checkpoint
        else:  # random weights: the latency does not depend on their values
            model = mobilenetv3.create_model(model_name, num_classes=classes, in_chans=in_chans).eval()
            weights_source = "random"
        model.preprocessing = Preprocessing.default(in_chans).replace(input_size=min(height, width), crop_pct=1.0)
        mobilenetv3.save_model(model, weights)
        paths = []
        for index in range(images):  # smooth random pictures: what a PNG decoder sees in photos, roughly
            small = rng.integers(0, 256, (height // 16, width // 16, in_chans), dtype=np.uint8)
            picture = Image.fromarray(small.squeeze(-1) if in_chans == 1 else small).resize((width, height))
            paths.append(Path(folder, "images", f"{index:03d}.png"))
            picture.save(paths[-1])
        engine = make_engine("onnxruntime", weights, images=paths[:4])
        array = np.zeros((1, in_chans, height, width), dtype=np.float32)
        engine(array)  # warm-up: ONNX Runtime plans the first call of a shape
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine(array)
            times.append(time.perf_counter() - started)
        list(predict_segmentation_files(paths[:2], engine, model.preprocessing, os.path.join(folder, "warm")))
        started = time.perf_counter()
        done = list(predict_segmentation_files(paths, engine, model.preprocessing, os.path.join(folder, "out")))
        whole = (time.perf_counter() - started) / len(done)
        rows.append({"setting": label, "height": height, "width": width, "in_chans": in_chans, "classes": classes,
                     "model": model_name, "weights": weights_source, "engine_ms_median": 1e3 * percentile(times, 0.5),
                     "engine_ms_p90": 1e3 * percentile(times, 0.9), "predict_ms_per_image": 1e3 * whole,
                     "images": len(done), "repeats": repeats})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion-mnist-seg")
    parser.add_argument("--variant", action="append", default=[], metavar='"NAME [KEY=VALUE ...]"')
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides for every variant (a variant's own come after and win)")
    parser.add_argument("--output", default="runs/segmentation", help="one run folder per variant inside it")
    parser.add_argument("--latency", action="store_true", help="time predict instead of training")
    parser.add_argument("--model", default="lraspp_mobilenetv3_large_100", help="--latency: the network")
    parser.add_argument("--checkpoint", default=None, help="--latency: trained canvas weights (else random)")
    parser.add_argument("--images", type=int, default=16, help="--latency: images predict runs on, per size")
    parser.add_argument("--repeats", type=int, default=30, help="--latency: engine calls timed, per size")
    args = parser.parse_args(argv)
    if args.latency:
        rows = measure_latency(args.model, args.checkpoint, os.path.join(args.output, "latency"), args.images,
                               args.repeats)
        recorded.record("segmentation_latency", {"rows": rows})
        return 0
    if not args.variant:
        parser.error("give --variant (one or more) or --latency")
    variants = [parse_variant(text) for text in args.variant]
    os.makedirs(args.output, exist_ok=True)
    for name, assignments in variants:
        result = run_variant(args.recipe, name, [*args.assignments, *assignments], args.output)
        print(json.dumps(result), flush=True)
        recorded.record("segmentation", result,
                               argv=[sys.argv[0], "--recipe", args.recipe, "--variant", " ".join([name, *assignments]),
                                     *[f"--set={item}" for item in args.assignments]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
