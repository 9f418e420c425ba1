"""Detection on fashion-mnist-det: train variants of a detection recipe one after another, each alone on the
CPU, and record each one's COCO box mAP@[.5:.95], mAP@.5, mAP@.75 and wall time.

Each variant is a name plus `--set` overrides of the recipe, run as its own `mobilenetv3 train` process (in
OUTPUT/NAME) with nothing else started beside it, so the wall times compare.  One record per variant goes to
benchmarks/results/detection.jsonl; docs/results.md and the README's Detection section show the latest record
of each variant.

    # the recipe's own run (SSDLite on MobileNetV3-Large 1.0 at 128x128)
    python benchmarks/detection.py --variant "large"
    python benchmarks/detection.py --variant "small model.name=ssdlite_mobilenetv3_small"
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import results as recorded  # benchmarks/results.py: this script's folder is on sys.path
from recipe_sweep import parse_variant, train_variant


def run_variant(recipe: str, name: str, overrides: list[str], output: str) -> dict:
    """Train one variant to the end; its results as plain data."""
    run = train_variant(recipe, name, overrides, output)
    rows, wall = run["rows"], run["wall_time_s"]
    last = rows[-1]
    best = max(rows, key=lambda row: row["val_map"])
    return {
        "variant": name, "overrides": overrides, "recipe": recipe, "model": run["model"], "params": run["params"],
        "epochs": len(rows), "wall_time_s": round(wall, 1),
        "train_time_s": round(sum(row["epoch_time_s"] for row in rows), 1),
        "train_images_per_s": round(sum(row["train_images_per_s"] for row in rows) / len(rows), 1),
        "last_map": last["val_map"], "last_map_50": last["val_map_50"], "last_map_75": last["val_map_75"],
        "best_map": best["val_map"], "best_epoch": best["epoch"], "val_samples": last["val_samples"],
        "map_by_epoch": [round(row["val_map"], 2) for row in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion-mnist-det")
    parser.add_argument("--variant", action="append", required=True, metavar='"NAME [KEY=VALUE ...]"')
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides for every variant (a variant's own come after and win)")
    parser.add_argument("--output", default="runs/detection", help="one run folder per variant inside it")
    args = parser.parse_args(argv)
    variants = [parse_variant(text) for text in args.variant]
    os.makedirs(args.output, exist_ok=True)
    for name, assignments in variants:
        result = run_variant(args.recipe, name, [*args.assignments, *assignments], args.output)
        print(json.dumps(result), flush=True)
        recorded.record("detection", result,
                        argv=[sys.argv[0], "--recipe", args.recipe, "--variant", " ".join([name, *assignments]),
                              *[f"--set={item}" for item in args.assignments]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
