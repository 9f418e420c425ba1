"""Fashion-MNIST benchmark: train the `fashion-mnist` recipe on this machine, report test accuracy and time.

Prints one JSON line: {"recipe", "model", "epochs", "test_top1", "test_top5", "test_loss", "wall_time_s", ...}.
The test split (10,000 images) is the validation set of the recipe, so test_top1 is the last epoch's val_top1.

    python benchmarks/fashion_mnist.py                          # the recipe as shipped (the 20-minute target)
    python benchmarks/fashion_mnist.py --epochs 2               # the `make demo` version
    python benchmarks/fashion_mnist.py --set model.name=mobilenetv3_small_100 --epochs 30   # longer runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench-fashion-mnist")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from mobilenetv3.train import load_config, run
    from mobilenetv3.train.config import parse_assignment

    overrides = [("output", args.output)]
    if args.epochs is not None:
        overrides.append(("epochs", args.epochs))
    if args.data_dir is not None:
        overrides.append(("data.data_dir", args.data_dir))
    overrides += [parse_assignment(text) for text in args.assignments]
    config = load_config("fashion-mnist", overrides=overrides)
    started = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - started
    final = summary["final"]
    print(json.dumps({
        "recipe": "fashion-mnist", "model": summary["model"], "epochs": summary["epochs"],
        "test_top1": round(final["val_top1"], 2), "test_top5": round(final["val_top5"], 2),
        "test_loss": round(final["val_loss"], 4), "test_samples": final["val_samples"],
        "wall_time_s": round(wall, 1), "train_time_s": round(sum_epoch_times(summary["output"]), 1),
        "cpu_threads": __import__("torch").get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2), "output": summary["output"],
    }))
    return 0


def sum_epoch_times(output: str) -> float:
    from mobilenetv3.train.metrics import read_rows

    return sum(row["epoch_time_s"] for row in read_rows(os.path.join(output, "metrics.jsonl")))


if __name__ == "__main__":
    sys.exit(main())
