"""Soak test: train + evaluate through many SIGKILL / --resume cycles, then compare with one clean run.

A tiny deterministic CPU run (synthetic data, mobilenetv3_small_035 at 16 px, a checkpoint every step,
EMA, mixup) is started, SIGKILLed at a seeded random moment, resumed with `--resume`, killed again, ...
for `--cycles` cycles, then resumed to the end.  Two kinds of kill are drawn:

  epoch  after 1-3 more checkpoints, plus a random delay: lands in a training step, in validation,
         or (by chance) inside a checkpoint write;
  write  the worker stalls inside its n-th checkpoint write, after half of the temp file is on disk,
         and is killed there (the moment a non-atomic writer would corrupt last.pt).

After every kill, checkpoints/last.pt must load (torch.load(weights_only=True)) and must not be older
than the one before the kill.  At the end, the final last.pt / best.pt / epoch_NNNN.pt (weights, EMA,
optimizer, scheduler, scaler), the metrics rows (timings aside) and `mobilenetv3 eval` of the final
checkpoint must equal those of a clean, uninterrupted run bit for bit.  The last line printed is a JSON
summary; the exit status is 0 only when everything matched.

    python benchmarks/soak.py                       # 20 cycles (about 4 minutes on 2 busy CPU cores)
    python benchmarks/soak.py --cycles 4 --epochs 2 # the short version the tests run

`--worker` is the process the soak starts and kills: `mobilenetv3 train` with a hook that records each
checkpoint write in $SOAK_EVENTS and, when $SOAK_STALL_AT_SAVE=n, stalls inside the n-th one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import results  # benchmarks/results.py: this script's folder is on sys.path

EVENTS_ENV = "SOAK_EVENTS"
STALL_ENV = "SOAK_STALL_AT_SAVE"
#: metrics columns that measure time, not training: they differ between runs.
TIMING_KEYS = ("epoch_time_s", "train_images_per_s")
#: checkpoint entries that must be equal between the soaked and the clean run.
STATE_KEYS = ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step", "best", "metrics")

logger = logging.getLogger("soak")


# --------------------------------------------------------------------------------------------------------
# the worker: `mobilenetv3 train`, with checkpoint writes recorded (and one of them stalled on request)


def worker(train_args: list[str]) -> int:
    from mobilenetv3 import cli
    from mobilenetv3.train import checkpoint as ckpt

    events = Path(os.environ[EVENTS_ENV])
    stall_at = int(os.environ.get(STALL_ENV, "0"))
    real_save, real_atomic_write = ckpt.save, ckpt.atomic_write
    saves = 0

    def record(text: str) -> None:
        with open(events, "a") as handle:
            handle.write(text + "\n")

    def stall_after_half(write):
        def partial_write(tmp: str) -> None:
            write(tmp)
            size = os.path.getsize(tmp)
            os.truncate(tmp, size // 2)  # as if the process died half-way through torch.save
            record(f"stalled {size // 2}/{size} bytes")
            time.sleep(3600)
        return partial_write

    def save(path, payload):
        nonlocal saves
        saves += 1
        record(f"begin step {payload['step']} {Path(path).name}")
        if saves == stall_at:
            ckpt.atomic_write = lambda target, write: real_atomic_write(target, stall_after_half(write))
        result = real_save(path, payload)
        record(f"end step {payload['step']} {Path(path).name}")
        return result

    ckpt.save = save
    return cli.main(["train", *train_args])


# --------------------------------------------------------------------------------------------------------
# the soak


def train_arguments(args: argparse.Namespace) -> list[str]:
    return [
        "--data", "synthetic", "--model", "mobilenetv3_small_035", "--input-size", "16", "--device", "cpu",
        "--deterministic", "--workers", str(args.workers), "--epochs", str(args.epochs), "--batch-size", "4",
        "--seed", str(args.seed), "--ema", "--ema-decay", "0.9", "--checkpoint-every-steps", "1",
        "--set", f"data.synthetic_train_samples={args.train_samples}", "--set", "data.synthetic_val_samples=16",
        "--set", "data.synthetic_classes=4", "--set", "schedule.warmup_epochs=0", "--set", "threads=1",
        "--set", "regularization.mixup_alpha=0.2", "--set", "checkpoint.keep_last_epochs=2",
    ]


def cli_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "mobilenetv3", *arguments]  # the installed CLI, as a user runs it


def worker_command(*arguments: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", "--", *arguments]


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float) -> bool:
    """Poll until condition() (True) or the process exits (False); a hang is an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    process.kill()
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint, loaded the way every entry point loads it (weights_only)."""
    from mobilenetv3.train.checkpoint import load

    return int(load(path)["step"])


def kill_cycle(index: int, mode: str, rng: random.Random, command: list[str], folder: Path,
               timeout: float) -> dict[str, Any] | None:
    """Start the worker, SIGKILL it as `mode` says; None when the run finished before the kill."""
    events = folder / f"events_{index:03d}.txt"
    env = {**os.environ, EVENTS_ENV: str(events)}
    if mode == "write":
        env[STALL_ENV] = str(rng.randint(2, 4))  # >= 2: at least one complete checkpoint per cycle
        condition, what = (lambda: any(e.startswith("stalled") for e in read_events(events))), "a stalled write"
    else:
        wanted = rng.randint(1, 3)
        condition = lambda: sum(e.startswith("end") for e in read_events(events)) >= wanted  # noqa: E731
        what = f"{wanted} checkpoint(s)"
    with open(folder / f"worker_{index:03d}.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        reached = wait_for(condition, process, what, timeout)
        if reached and mode == "epoch":
            time.sleep(rng.uniform(0.0, 0.25))
        if process.poll() is not None:
            if process.returncode != 0:
                raise RuntimeError(f"worker {index} failed (exit {process.returncode}); see {log.name}")
            return None
        process.send_signal(signal.SIGKILL)
        process.wait()
    last = read_events(events)[-1] if read_events(events) else ""
    during_write = last.startswith(("begin", "stalled"))
    return {"cycle": index, "mode": mode, "during": "write" if during_write else "epoch", "last_event": last}


def state_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where two checkpoint values differ (None when equal, tensors compared bit for bit)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return None if same else where
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where} keys {sorted(set(a) ^ set(b), key=str)}"
        for key in a:
            if key in TIMING_KEYS:
                continue
            found = state_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} length"
        for i, (x, y) in enumerate(zip(a, b)):
            found = state_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else where


def compare_runs(clean: Path, soaked: Path) -> list[str]:
    """Every difference between the two runs' checkpoints and metrics rows (empty: identical)."""
    from mobilenetv3.train.checkpoint import load
    from mobilenetv3.train.metrics import read_rows

    differences = []
    names = sorted(p.name for p in (clean / "checkpoints").glob("*.pt"))
    soaked_names = sorted(p.name for p in (soaked / "checkpoints").glob("*.pt"))
    if names != soaked_names:
        differences.append(f"checkpoint files: clean {names} vs soaked {soaked_names}")
    for name in set(names) & set(soaked_names):
        a, b = load(clean / "checkpoints" / name), load(soaked / "checkpoints" / name)
        for key in STATE_KEYS:
            found = state_difference(a.get(key), b.get(key), f"{name}:{key}")
            if found:
                differences.append(found)
    found = state_difference(read_rows(clean / "metrics.jsonl"), read_rows(soaked / "metrics.jsonl"), "metrics")
    if found:
        differences.append(found)
    return differences


def evaluate(checkpoint: Path, workers: int) -> dict[str, Any]:
    """`mobilenetv3 eval --checkpoint CHECKPOINT --data synthetic` (its library call: one process fewer)."""
    from mobilenetv3.train.evaluation import evaluate_file

    result = evaluate_file(checkpoint, "synthetic", workers=workers, device="cpu")
    return {key: result[key] for key in ("top1", "top5", "loss", "samples")}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mobilenetv3-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    common = train_arguments(args)
    clean, soaked = work / "clean", work / "soaked"

    subprocess.run(cli_command("train", *common, "--output", str(clean)), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # About a third of the kills stall inside a write; at least one of each kind when there are 2+ cycles.
    modes = ["write" if rng.random() < 1 / 3 else "epoch" for _ in range(args.cycles)]
    if args.cycles >= 2:
        if "write" not in modes:
            modes[rng.randrange(args.cycles)] = "write"
        if "epoch" not in modes:
            modes[rng.randrange(args.cycles)] = "epoch"
    kills: list[dict[str, Any]] = []
    readable, monotonic, previous_step = True, True, -1
    last_pt = soaked / "checkpoints" / "last.pt"
    for index, mode in enumerate(modes):
        resume = ["--resume"] if last_pt.is_file() else []
        command = worker_command(*common, "--output", str(soaked), *resume)
        kill = kill_cycle(index, mode, rng, command, work, args.timeout)
        if kill is None:
            logger.warning("the run finished before cycle %d's kill: use more --epochs or --train-samples", index)
            break
        try:
            kill["last_pt_step"] = step = checkpoint_step(last_pt)
        except Exception as error:  # noqa: BLE001 (any failure to read it is the finding)
            kill["last_pt_error"] = str(error)
            readable, step = False, previous_step
        monotonic &= step >= previous_step
        previous_step = step
        kills.append(kill)
        logger.info("cycle %d: %s kill, landed during %s (%s); last.pt at step %s", index, mode, kill["during"],
                    kill["last_event"], kill.get("last_pt_step"))

    final = subprocess.run(cli_command("train", *common, "--output", str(soaked), "--resume"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if final.returncode != 0:
        raise RuntimeError(f"the final resume failed: {final.stderr.strip().splitlines()[-1:]}")

    differences = compare_runs(clean, soaked)
    evaluations = {run.name: evaluate(run / "checkpoints" / "last.pt", args.workers) for run in (clean, soaked)}
    if evaluations["clean"] != evaluations["soaked"]:
        differences.append(f"eval: {evaluations}")
    summary = {
        "cycles": len(kills),
        "kills_during_write": sum(k["during"] == "write" for k in kills),
        "kills_during_epoch": sum(k["during"] == "epoch" for k in kills),
        "stalled_write_kills": sum(k["mode"] == "write" for k in kills),
        "last_pt_readable_after_every_kill": readable,
        "last_pt_never_went_back": monotonic,
        "final_step": checkpoint_step(last_pt),
        "leftover_temp_files": len(list((soaked / "checkpoints").glob(".*.tmp"))),
        "eval_top1": evaluations["soaked"]["top1"],
        "equal": not differences,
        "differences": differences[:5],
        "seed": args.seed,
        "workdir": str(work),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20, help="start / kill / resume cycles (default 20)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-samples", type=int, default=96, help="synthetic training images (batch 4)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of each run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the training run and the kill moments")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a new temp folder)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a cycle may take to reach its kill")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args)
    if args.cycles < 1 or args.epochs < 1:
        parser.error("--cycles and --epochs must be positive")
    logging.basicConfig(level=logging.INFO, format="soak: %(message)s", stream=sys.stderr)
    summary = soak(args)
    print(json.dumps(summary))
    results.record("soak", summary, argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    return 0 if summary["equal"] and summary["last_pt_readable_after_every_kill"] else 1


if __name__ == "__main__":
    sys.exit(main())
