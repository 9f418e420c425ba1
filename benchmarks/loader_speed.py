"""Fashion-MNIST training-batch cost: the batched seeded path against seeding torch's RNG per image, side by side.

The training loader wraps the dataset in `SeededSamples`, which hands every sample its own seed. For the
in-memory Fashion-MNIST images (no auto-augment) the whole batch then goes through
`SmallImageTrainTransform.seeded`: per-image draws from NumPy generators, then a few batched tensor ops. The
other path, which every other dataset takes, reseeds torch's RNG and transforms image by image. This times one
batch of each, round-robin (the same sampler keys for both), in this process with one intra-op thread, as a
`workers: 0` training rank does; it reports the median milliseconds per batch and their ratio, and appends them to
benchmarks/results/loader_speed.jsonl.

    python benchmarks/loader_speed.py                       # fashion-mnist-large's augmentation, batch 128
    python benchmarks/loader_speed.py --batch-size 256 --set data.random_erasing=0
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

import torch

import results  # benchmarks/results.py: this script's folder is on sys.path


class PerImage(torch.utils.data.Dataset):
    """The dataset without its batched seeded path: `SeededSamples` reseeds torch's RNG image by image."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]


def main() -> int:
    from mobilenetv3.data import build_datasets, collate_skipping
    from mobilenetv3.timing import time_interleaved
    from mobilenetv3.train.config import load_config, parse_assignment
    from mobilenetv3.data.samplers import ResumableSampler, SeededSamples

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist-large")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--min-time", type=float, default=5.0, help="seconds of timing per path")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.recipe, overrides=[parse_assignment(item) for item in args.assignments])
    train = build_datasets(config.data).train
    sampler = ResumableSampler(train, seed=config.seed)  # one process: a seeded shuffle
    sampler.set_position(epoch=0)
    keys = list(sampler)
    batches = [keys[start:start + args.batch_size] for start in range(0, len(keys), args.batch_size)]
    paths = {"batched": SeededSamples(train), "per_image": SeededSamples(PerImage(train))}
    assert paths["batched"].dataset.batch_seedable, "this recipe's transform has no batched seeded path"

    def batch_after_batch(dataset: SeededSamples):
        in_order = itertools.cycle(batches)  # both paths see the same batches in the same order
        return lambda: collate_skipping(dataset.__getitems__(next(in_order)))

    calls = {name: batch_after_batch(dataset) for name, dataset in paths.items()}
    times = time_interleaved(calls, device=torch.device("cpu"), warmup=2, min_repeats=10, min_seconds=args.min_time)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    measured = {"recipe": args.recipe, "batch_size": args.batch_size,
                "ms_per_batch": {name: round(value, 2) for name, value in medians.items()},
                "batches_timed": {name: len(values) for name, values in times.items()},
                "speedup": round(medians["per_image"] / medians["batched"], 1), "overrides": args.assignments}
    print(json.dumps(measured))
    results.record("loader_speed", measured, argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
