"""The image folder's training input pipeline against torchvision's reference, per core, side by side.

Photo-like JPEGs (smooth random colour fields at several scales plus grain, 500x375, quality 90; written to a
temporary folder in ImageNet layout) go through, in this one process with one thread (a DataLoader with
`workers: 0`, as one core of a loader does):

- torchvision: the reference scripts' pipeline, `ImageFolder` (PIL decode, RGB) with `transforms`
  RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize, default collate;
- decode_jpeg + v2: `torchvision.io.decode_jpeg` and `transforms.v2` on uint8 tensors, to float, normalised;
- ours: `train`'s own training batches (`build_datasets` + `build_loaders`: the folder's pipeline, per-sample
  seeds, collate, then the finishing step on the CPU: float32 normalised, ready for the model);
- ours, uint8: the same batches before that step, i.e. the work left to a loader core when the GPU normalises.

glibc keeps freed memory for all of them (`keep_freed_memory`, as `train` does on a CPU: a fresh 38 MB float
batch costs page faults otherwise).  One batch of each in turn (round-robin), until each has been timed for --min-time seconds; images/s per core
from the median batch, and each contestant's ratio to torchvision's.  The criterion (issue 27): ours >= 1.5x.
Appends the result to benchmarks/results/jpeg_loader.jsonl (`make results` renders docs/results.md).

    python benchmarks/jpeg_loader.py                          # 256 JPEGs, batch 64, 20 s per contestant
    python benchmarks/jpeg_loader.py --clock cpu              # this process's CPU seconds (a shared machine)
    python benchmarks/jpeg_loader.py --set data.auto_augment=randaugment --set data.random_erasing=0.2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import results  # benchmarks/results.py: this script's folder is on sys.path

WIDTH, HEIGHT, QUALITY = 500, 375, 90


def photo_like(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Smooth random colour fields at four scales plus grain: compresses like a photograph (~80 KB at 500x375,
    quality 90), where a smooth field alone would compress (and decode) several times faster."""
    out = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((6, 90), (24, 45), (96, 25), (250, 16)):
        small = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        for channel in range(3):
            field = Image.fromarray(small[..., channel], mode="F").resize((width, height), Image.Resampling.BICUBIC)
            out[..., channel] += amplitude * np.asarray(field)
    out += rng.normal(0, 6, out.shape)
    return Image.fromarray(np.clip(out + 128, 0, 255).astype(np.uint8))


def write_folder(root: Path, images: int, classes: int = 4, seed: int = 0, processes: int = 1) -> Path:
    """`images` photo-like JPEGs in root/train/<class>/, and one per class in root/val/<class>/; image k is drawn
    from its own generator (seed, k), so `processes` changes only how fast they are written."""
    paths = []
    for index in range(images + classes):
        split, label = ("train", index % classes) if index < images else ("val", index - images)
        (root / split / f"class_{label}").mkdir(parents=True, exist_ok=True)
        paths.append((root / split / f"class_{label}" / f"{index:05d}.jpg", seed, index))
    if processes > 1:
        with concurrent.futures.ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_one, paths, chunksize=16))
    else:
        for item in paths:
            _write_one(item)
    return root


def _write_one(item: tuple[Path, int, int]) -> None:
    path, seed, index = item
    photo_like(np.random.default_rng([seed, index])).save(path, quality=QUALITY)


def main() -> int:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2

    from mobilenetv3.allocator import keep_freed_memory
    from mobilenetv3.data import build_datasets
    from mobilenetv3.preprocessing import IMAGENET_MEAN, IMAGENET_STD
    from mobilenetv3.timing import CLOCKS, time_interleaved
    from mobilenetv3.train.config import load_config, parse_assignment
    from mobilenetv3.train.distributed import DistEnv
    from mobilenetv3.train.run import build_loaders

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="JPEGs written (default 256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-time", type=float, default=20.0, help="seconds of timing per contestant")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall (default) or cpu: this process's CPU seconds, for a shared machine")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="training config overrides for ours (e.g. data.auto_augment=randaugment); the "
                             "reference contestants have only crop, flip and normalisation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as `train` on a CPU does, for every contestant: no page faults per fresh float batch
    with tempfile.TemporaryDirectory(prefix="jpeg-loader-") as folder:
        root = write_folder(Path(folder), args.images)
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        reference = datasets.ImageFolder(str(root / "train"), transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
        tensors = datasets.ImageFolder(str(root / "train"), v2.Compose([
            v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]), loader=lambda path: decode_jpeg(read_file(path),
                                                                                      mode=ImageReadMode.RGB))
        overrides = [("data.dataset", str(root)), ("data.workers", "0"), ("batch_size", str(args.batch_size)),
                     ("data.input_size", "224"), *(parse_assignment(item) for item in args.assignments)]
        config = load_config(overrides=overrides)
        env = DistEnv(device=torch.device("cpu"))
        ours, ours_sampler, _ = build_loaders(config, build_datasets(config.data), env)
        unfinished, unfinished_sampler, _ = build_loaders(config, build_datasets(config.data), env)
        loaders = {  # name -> (loader, its ResumableSampler or None)
            "torchvision": (DataLoader(reference, batch_size=args.batch_size, shuffle=True, drop_last=True), None),
            "decode_jpeg_v2": (DataLoader(tensors, batch_size=args.batch_size, shuffle=True, drop_last=True), None),
            "ours": (ours, ours_sampler),
            "ours_uint8": (unfinished.loader, unfinished_sampler),  # the batches before the (device) normalisation
        }

        def batch_after_batch(loader, sampler):
            def epochs():
                for epoch in itertools.count():
                    if sampler is not None:  # ours: a new shuffle each pass (the others reshuffle themselves)
                        sampler.set_position(epoch)
                    yield from loader
            batches = epochs()
            return lambda: next(batches)

        calls = {name: batch_after_batch(*pair) for name, pair in loaders.items()}
        for images, _, *_ in (calls["ours"](), calls["ours_uint8"]()):
            assert images.shape == (args.batch_size, 3, 224, 224)
        times = time_interleaved(calls, device=torch.device("cpu"), warmup=2, min_repeats=10,
                                 min_seconds=args.min_time, clock=args.clock)
    per_s = {name: args.batch_size / statistics.median(values) for name, values in times.items()}
    measured = {
        "images": args.images, "size": [WIDTH, HEIGHT], "quality": QUALITY, "batch_size": args.batch_size,
        "clock": args.clock, "threads": torch.get_num_threads(),
        "images_per_s": {name: round(value, 1) for name, value in per_s.items()},
        "vs_torchvision": {name: round(value / per_s["torchvision"], 3) for name, value in per_s.items()},
        "batches_timed": {name: len(values) for name, values in times.items()},
        "overrides": args.assignments,
    }
    print(json.dumps(measured))
    results.record("jpeg_loader", measured, argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
