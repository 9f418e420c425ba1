"""Time the training input pipeline as `train` runs it (files -> decoded, augmented, collated batches on the
device, normalised: ready for the model), without the network: the images per second the loader can feed.

The data settings come from the built-in config, a --recipe (its augmentation: auto-augment, erasing, ...) and
--set; the first batches (worker start-up) are not timed.  With --json the last line is
{"images_per_s": ..., "workers": ..., "batch_size": ...} (plus what else was measured).

examples:
  mobilenetv3 bench-loader --data /data/imagenet --workers 8
  mobilenetv3 bench-loader --data /data/imagenet --recipe imagenet-timm --batch-size 256 --batches 100 --json
  mobilenetv3 bench-loader --data /data/imagenet --set data.decode=gpu
"""

from __future__ import annotations

import argparse
import json

HELP = "images per second of the training input pipeline (decode, augment, collate, to the device)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="what train would read: a folder in ImageNet layout (DIR/train/<class>/*), "
                             "fashion-mnist or synthetic")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (default 64)")
    parser.add_argument("--batches", type=int, default=50, metavar="N", help="batches timed (default 50)")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="DataLoader worker processes (default: the recipe's data.workers, else 2)")
    parser.add_argument("--input-size", type=int, default=None, metavar="S",
                        help="training crop size (default: the data's, 224 for folders)")
    parser.add_argument("--recipe", default=None, help="take the data settings (augmentation) of this recipe")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="set any training config key, e.g. --set data.decode=gpu (repeatable)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the measurements")


def run(args: argparse.Namespace) -> int:
    from ..train.config import load_config, parse_assignment  # torch on use only: `--help` stays torch-free
    from ..train.loader_bench import bench_loader

    overrides = [("data.dataset", args.data), ("batch_size", str(args.batch_size))]
    for key, value in (("data.workers", args.workers), ("data.input_size", args.input_size), ("device", args.device)):
        if value is not None:
            overrides.append((key, str(value)))
    overrides += [parse_assignment(text) for text in args.assignments]
    config = load_config(args.recipe, None, overrides)
    result = bench_loader(config, batches=args.batches)
    skipped = f", {result['skipped']} unreadable file(s) skipped" if result["skipped"] else ""
    print(f"bench-loader: {result['images_per_s']:.1f} images/s ({result['images']} images in "
          f"{result['seconds']:.2f} s; batch {result['batch_size']}, {result['workers']} worker(s), "
          f"decode on {result['decode']}, to {result['device']}{skipped})")
    if args.json:
        keys = ("images_per_s", "workers", "batch_size")
        print(json.dumps({**{key: result[key] for key in keys},
                          **{key: value for key, value in result.items() if key not in keys}}))
    return 0
