"""`mobilenetv3 predict` against the script a torchvision user writes, both timed as whole processes.

What it does, in one run:
  1. writes N synthetic 320x240 JPEGs (smooth random colour fields, so predictions vary);
  2. builds torchvision's mobilenet_v3_large with random weights and *calibrated* BatchNorm statistics
     (running mean/var measured on these images: no downloads are possible here, and untouched random
     BN statistics make the logits vanish), saves its state dict, and converts it with
     `mobilenetv3 convert --from torchvision --arch mobilenet_v3_large.IMAGENET1K_V1`;
  3. runs the plain user script (PIL decode, Resize(256) / CenterCrop(224), batches of 32, eager
     `mobilenet_v3_large`) and `mobilenetv3 predict --topk 1 --json` as subprocesses, alternating,
     `--repeats` times each; the first `predict` run (which exports to ONNX and fills the cache) is
     reported separately;
  4. reports median wall times, the speed-up and the top-1 agreement, and appends them to
     benchmarks/results/predict_speed.jsonl.

    .venv/bin/python benchmarks/predict_speed.py [--images 512] [--repeats 3] [--engines onnxruntime,torch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

import results  # benchmarks/results.py: this script's folder is on sys.path

USER_SCRIPT = '''\
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision import transforms

model = torchvision.models.mobilenet_v3_large()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.eval()
transform = transforms.Compose([
    transforms.Resize(256),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])
paths = sorted(Path(sys.argv[2]).rglob("*.jpg"))
with torch.no_grad():
    for start in range(0, len(paths), 32):
        chunk = paths[start:start + 32]
        batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in chunk])
        for path, index in zip(chunk, model(batch).argmax(1).tolist()):
            print(path, index)
'''


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random colour fields with a little noise, saved as 320x240 JPEGs (quality 90)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        coarse = rng.integers(0, 256, (rng.integers(2, 9), rng.integers(2, 9), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((320, 240), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (240, 320, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)


def calibrated_torchvision_large(folder: Path, calibration_images: int = 64) -> torch.nn.Module:
    """torchvision's Large, random weights, BN running statistics measured on `folder`'s images."""
    from mobilenetv3.timing import calibrate_batchnorm
    from torchvision import transforms

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_large()
    transform = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    paths = sorted(folder.glob("*.jpg"))[:calibration_images]
    calibrate_batchnorm(model, torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    return model.eval()


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, done.stdout


def parse_user(stdout: str) -> dict[str, int]:
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in stdout.splitlines() if line.strip()}


def parse_predict(stdout: str) -> dict[str, int]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {row["path"]: row["topk"][0]["index"] for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each command (alternating)")
    parser.add_argument("--engines", default="onnxruntime,torch", help="predict engines to time")
    parser.add_argument("--workdir", default=None, help="keep images, weights and cache here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON object")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="predict_speed_"))
    images, cache = work / "images", work / "cache"
    env = {**os.environ, "MOBILENETV3_CACHE": str(cache)}
    if not images.is_dir() or len(list(images.glob("*.jpg"))) != args.images:
        write_images(images, args.images)
    tv_weights, ours = work / "tv_large.pth", work / "large.safetensors"
    torch.save(calibrated_torchvision_large(images).state_dict(), tv_weights)
    subprocess.run([sys.executable, "-m", "mobilenetv3", "convert", "--from", "torchvision", "--arch",
                    "mobilenet_v3_large.IMAGENET1K_V1", str(tv_weights), str(ours)], check=True, env=env,
                   capture_output=True)
    script = work / "user_script.py"
    script.write_text(USER_SCRIPT)

    user_cmd = [sys.executable, str(script), str(tv_weights), str(images)]
    predict_cmds = {
        engine: [sys.executable, "-m", "mobilenetv3", "predict", "--checkpoint", str(ours), "--topk", "1", "--json",
                 "--engine", engine, str(images)]
        for engine in args.engines.split(",")
    }
    cold_time = None
    if "onnxruntime" in predict_cmds:
        for stale in cache.glob("onnx/*.onnx"):
            stale.unlink()
        cold_time, _ = timed(predict_cmds["onnxruntime"], env)  # exports to ONNX and fills the cache
        if not list(cache.glob("onnx/*.onnx")):  # predict fell back to eager PyTorch (its warning says why)
            raise SystemExit("the ONNX export was not made: the onnxruntime rows would time eager PyTorch")

    times: dict[str, list[float]] = {"user script": [], **{f"predict ({e})": [] for e in predict_cmds}}
    outputs: dict[str, str] = {}
    for _ in range(args.repeats):
        elapsed, outputs["user script"] = timed(user_cmd, env)
        times["user script"].append(elapsed)
        for engine, command in predict_cmds.items():
            elapsed, outputs[f"predict ({engine})"] = timed(command, env)
            times[f"predict ({engine})"].append(elapsed)

    reference = parse_user(outputs["user script"])
    baseline = statistics.median(times["user script"])
    summary = {"images": args.images, "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "torchvision": torchvision.__version__, "repeats": args.repeats, "rows": []}
    best_baseline = min(times["user script"])
    print(f"{args.images} JPEGs 320x240, {summary['cpus']} CPUs, {args.repeats} whole-process runs each, alternating")
    print(f"{'command':24s} {'median s':>9s} {'img/s':>7s} {'speed-up':>9s} {'fastest s':>10s} {'speed-up':>9s} "
          f"{'top-1 agree':>12s}")
    for name, runs in times.items():
        wall, best = statistics.median(runs), min(runs)
        predicted = reference if name == "user script" else parse_predict(outputs[name])
        agree = sum(predicted.get(path) == index for path, index in reference.items()) / len(reference)
        print(f"{name:24s} {wall:9.2f} {args.images / wall:7.1f} {baseline / wall:8.2f}x {best:10.2f} "
              f"{best_baseline / best:8.2f}x {agree:11.1%}")
        summary["rows"].append({"command": name, "wall_s": wall, "fastest_s": best, "runs_s": runs,
                                "speedup": baseline / wall, "speedup_fastest": best_baseline / best,
                                "top1_agreement": agree})
    distinct = len(set(reference.values()))
    print(f"distinct top-1 classes in the reference: {distinct}")
    if cold_time is not None:
        print(f"first predict run (ONNX export + cache fill included): {cold_time:.2f} s")
    summary.update(distinct_top1=distinct, cold_predict_s=cold_time)
    if args.json:
        print(json.dumps(summary))
    results.record("predict_speed", summary, argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
