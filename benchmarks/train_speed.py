"""CPU training throughput with and without `keep_freed_memory`, measured side by side in one run.

Each trial is a real `mobilenetv3 train` run of one epoch cut to --batches steps (validation cut to one
batch), under `torchrun --standalone` when --nproc-per-node > 1; trials alternate between the two settings
(on, off, on, off, ...) so that a change in machine load hits both alike.  Reported: each trial's training
images/s (`train_images_per_s` of its metrics.jsonl: the whole cut epoch, first step included) and the ratio
of the medians (on / off), appended to benchmarks/results/train_speed.jsonl.

    python benchmarks/train_speed.py                                   # fashion-mnist-large, 2 processes
    python benchmarks/train_speed.py --recipe fashion-mnist --nproc-per-node 1 --batches 100
    python benchmarks/train_speed.py --set model.name=mobilenetv3_large_100  # the recipe's earlier network
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import results  # benchmarks/results.py: this script's folder is on sys.path


def trial(args: argparse.Namespace, keep: bool, output: str) -> float:
    train = ["-m", "mobilenetv3", "train", "--recipe", args.recipe, "--output", output, "--epochs", "1",
             "--limit-train-batches", str(args.batches), "--limit-val-batches", "1",
             f"--set=keep_freed_memory={str(keep).lower()}", *(f"--set={item}" for item in args.assignments)]
    if args.nproc_per_node > 1:
        train = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"] + train
    subprocess.run([sys.executable, *train], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(output, "metrics.jsonl")) as handle:
        return json.loads(handle.readlines()[-1])["train_images_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist-large")
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--batches", type=int, default=60, help="training steps per trial")
    parser.add_argument("--trials", type=int, default=3, help="trials per setting")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every trial (e.g. model.name=mobilenetv3_large_100)")
    args = parser.parse_args()
    speeds: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.trials):
            for setting in ("on", "off"):
                images_per_s = trial(args, setting == "on", os.path.join(folder, f"{setting}-{index}"))
                speeds[setting].append(round(images_per_s, 1))
                print(f"trial {index + 1} keep_freed_memory={setting}: {images_per_s:.1f} img/s", file=sys.stderr)
    on, off = statistics.median(speeds["on"]), statistics.median(speeds["off"])
    measured = {"recipe": args.recipe, "processes": args.nproc_per_node, "steps_per_trial": args.batches,
                "images_per_s_on": speeds["on"], "images_per_s_off": speeds["off"],
                "median_ratio_on_over_off": round(on / off, 3), "cpus": os.cpu_count(), "overrides": args.assignments}
    print(json.dumps(measured))
    results.record("train_speed", measured, argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
