"""Fashion-MNIST benchmark: train a Fashion-MNIST recipe on this machine, report test accuracy and time.

Prints one JSON line: {"recipe", "model", "epochs", "test_top1", "test_top5", "test_loss", "wall_time_s", ...},
and appends it to benchmarks/results/fashion_mnist.jsonl (docs/results.md).
The test split (10,000 images) is the validation set of the recipes, so test_top1 is the last epoch's val_top1.
wall_time_s is the whole training (with --nproc-per-node: the whole torchrun, process start-up included).
--tta also scores the final weights (and the SWA average, if any) with two-view flip test-time augmentation
(`mobilenetv3 eval --tta flip`), reported apart as *_flip_tta_test_top1 with its own time: it is not the
single-view test_top1 that the targets use.

    python benchmarks/fashion_mnist.py                          # `fashion-mnist` as shipped, 1 process
    python benchmarks/fashion_mnist.py --epochs 4               # the `make demo` version
    python benchmarks/fashion_mnist.py --recipe fashion-mnist-large --nproc-per-node 2   # the 60-minute target

The 20-minute target (93%) was met by 2 processes with the per-rank batch halved, so that the global batch
stays at the recipe's 256 (docs/history.md):
    torchrun --standalone --nproc_per_node=2 -m mobilenetv3 train --recipe fashion-mnist --epochs 28 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import results  # benchmarks/results.py: this script's folder is on sys.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion-mnist", help="fashion-mnist (1 process) or fashion-mnist-large")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="> 1: run under `torchrun --standalone` with this many processes (1 thread each)")
    parser.add_argument("--output", default=None, help="run folder (default runs/bench-RECIPE)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tta", action="store_true", help="also report flip-TTA accuracy of the final weights")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    output = args.output or f"runs/bench-{args.recipe}"

    from mobilenetv3.train import load_config, run
    from mobilenetv3.train.config import parse_assignment
    from mobilenetv3.train.metrics import read_rows

    overrides = [("output", output)]
    if args.epochs is not None:
        overrides.append(("epochs", args.epochs))
    if args.data_dir is not None:
        overrides.append(("data.data_dir", args.data_dir))
    overrides += [parse_assignment(text) for text in args.assignments]
    config = load_config(args.recipe, overrides=overrides)  # bad keys fail here, before any process starts
    started = time.perf_counter()
    if args.nproc_per_node > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc_per_node}", "-m", "mobilenetv3", "train", "--recipe", args.recipe]
        command += [f"--set={key}={value}" for key, value in overrides]
        code = subprocess.call(command)
        if code != 0:
            return code
        model, world_size = config.model.name, args.nproc_per_node
    else:
        summary = run(config)
        model, world_size = summary["model"], 1
    wall = time.perf_counter() - started
    rows = read_rows(os.path.join(output, "metrics.jsonl"))
    final = rows[-1]
    tta = flip_tta_results(output, config.data, with_swa="swa_val_top1" in final) if args.tta else {}
    measured = {
        "recipe": args.recipe, "model": model, "epochs": final["epoch"], "processes": world_size,
        "test_top1": round(final["val_top1"], 2), "test_top5": round(final["val_top5"], 2),
        "test_loss": round(final["val_loss"], 4), "test_samples": final["val_samples"],
        # the averaged models, when the recipe (or --set ema.enabled / swa.enabled) keeps them
        **{f"{prefix}_test_top1": round(final[f"{prefix}_val_top1"], 2)
           for prefix in ("ema", "swa") if f"{prefix}_val_top1" in final},
        "wall_time_s": round(wall, 1), "train_time_s": round(sum(row["epoch_time_s"] for row in rows), 1),
        "cpu_threads_per_process": config.threads or __import__("torch").get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2), "output": output, **tta,
    }
    print(json.dumps(measured))
    results.record("fashion_mnist", measured, argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    return 0


def flip_tta_results(output: str, data, *, with_swa: bool) -> dict:
    """Flip-TTA top-1 of the last checkpoint and, when this run averaged, of its swa.safetensors; and the time."""
    from mobilenetv3.train.evaluation import evaluate_file

    started = time.perf_counter()
    files = {"flip_tta_test_top1": os.path.join(output, "checkpoints", "last.pt")}
    if with_swa:  # (a reused --output may hold an older run's swa.safetensors)
        files["swa_flip_tta_test_top1"] = os.path.join(output, "checkpoints", "swa.safetensors")
    top1 = {key: round(evaluate_file(path, data.dataset, data_dir=data.data_dir, tta="flip")["top1"], 2)
            for key, path in files.items()}
    return {**top1, "flip_tta_eval_time_s": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    sys.exit(main())
