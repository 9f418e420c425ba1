"""Recipe sweep: train variants of one recipe side by side, one process each, and compare their test top-1.

Each variant is a name plus `--set` overrides of the recipe.  All run at once (one `mobilenetv3 train` process
per variant, each in its own run folder) until they finish or `--deadline` seconds pass; then one JSON line per
variant (last and best val_top1, epochs done, wall time) and a table sorted by the last epoch's top-1; the
sweep is appended to benchmarks/results/recipe_sweep.jsonl.
A variant stopped by the deadline reports the epochs it finished, marked "stopped".

Made for choosing a CPU recipe with a GPU's help (benchmarks/gpu_recipe_sweep.sh runs it on a lent GPU).
Fashion-MNIST's per-sample augmentation, not the GPU, sets the pace: give each variant DataLoader workers
(the H200 sweep's timings are in docs/history.md).

    python benchmarks/recipe_sweep.py --recipe fashion-mnist-large --set batch_size=256 --set threads=0 \
        --variant "sgd" --variant "adamw optim.name=adamw optim.lr=0.004 optim.weight_decay=0.01" \
        --variant "light model.drop_rate=0.0 data.random_erasing=0.1" --deadline 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import results as recorded  # benchmarks/results.py: this script's folder is on sys.path


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, *assignments = text.split()
    bad = [item for item in assignments if "=" not in item]
    if bad:
        raise SystemExit(f"variant {name!r}: expected KEY=VALUE overrides, got {' '.join(bad)}")
    return name, assignments


def read_metrics(path: str) -> list[dict]:
    from mobilenetv3.train.metrics import read_rows

    return read_rows(path) if os.path.exists(path) else []


def train_variant(recipe: str, name: str, overrides: list[str], output: str) -> dict:
    """Train one variant of `recipe` to the end, alone, as its own `mobilenetv3 train` process in OUTPUT/NAME:
    {"rows": its metrics rows, "wall_time_s", "model", "params", "log": its log's path} (benchmarks/segmentation.py
    and detection.py build their records from it)."""
    import re

    folder = os.path.join(output, name)
    command = [sys.executable, "-m", "mobilenetv3", "train", "--recipe", recipe, "--output", folder,
               *[f"--set={item}" for item in overrides]]
    log_path = os.path.join(output, f"{name}.log")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    rows = read_metrics(os.path.join(folder, "metrics.jsonl"))
    if code != 0 or not rows:
        raise SystemExit(f"variant {name}: train exited {code}; see {log_path}")
    model = re.search(r"model (\S+) \(([\d,]+) params\)", open(log_path).read())
    return {"rows": rows, "wall_time_s": wall, "model": model.group(1) if model else None,
            "params": int(model.group(2).replace(",", "")) if model else None, "log": log_path}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--variant", action="append", required=True, metavar='"NAME [KEY=VALUE ...]"')
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides for every variant (a variant's own come after and win)")
    parser.add_argument("--output", default="runs/sweep", help="one run folder per variant inside it")
    parser.add_argument("--deadline", type=float, default=None, help="stop every variant still running after S s")
    args = parser.parse_args(argv)
    variants = [parse_variant(text) for text in args.variant]
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit("variant names must differ")

    os.makedirs(args.output, exist_ok=True)
    started = time.perf_counter()
    processes = {}
    for name, assignments in variants:
        folder = os.path.join(args.output, name)
        command = [sys.executable, "-m", "mobilenetv3", "train", "--recipe", args.recipe, "--output", folder]
        command += [f"--set={item}" for item in [*args.assignments, *assignments]]
        log = open(os.path.join(args.output, f"{name}.log"), "w")
        processes[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log, folder)

    finished: dict[str, tuple[int | None, float]] = {}
    while len(finished) < len(processes):
        for name, (process, log, _) in processes.items():
            if name not in finished and process.poll() is not None:
                finished[name] = (process.returncode, time.perf_counter() - started)
                log.close()
        if args.deadline is not None and time.perf_counter() - started > args.deadline:
            for name, (process, log, _) in processes.items():
                if name not in finished:
                    process.kill()
                    process.wait()
                    log.close()
                    finished[name] = (None, time.perf_counter() - started)
        time.sleep(1)

    results = []
    for name, assignments in variants:
        code, wall = finished[name]
        rows = read_metrics(os.path.join(processes[name][2], "metrics.jsonl"))
        result = {"variant": name, "overrides": assignments, "status": "done" if code == 0 else
                  ("stopped" if code is None else f"failed ({code})"), "epochs": len(rows),
                  "last_top1": rows[-1]["val_top1"] if rows else None,
                  "best_top1": max(row["val_top1"] for row in rows) if rows else None, "wall_time_s": round(wall, 1)}
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{'variant':16s} {'status':10s} {'epochs':>6s} {'last top1':>9s} {'best top1':>9s}  overrides")
    for r in sorted(results, key=lambda r: -(r["last_top1"] or 0)):
        last = f"{r['last_top1']:.2f}" if r["last_top1"] is not None else "-"
        best = f"{r['best_top1']:.2f}" if r["best_top1"] is not None else "-"
        print(f"{r['variant']:16s} {r['status']:10s} {r['epochs']:6d} {last:>9s} {best:>9s}  {' '.join(r['overrides'])}")
    recorded.record("recipe_sweep", {"recipe": args.recipe, "overrides": args.assignments, "variants": results},
                    argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    return 0 if all(r["status"] == "done" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
