"""Which samples a process loads, in which order, and with which augmentation seed.

Training order and augmentation are pure functions of (seed, epoch, index): `ResumableSampler` shuffles
like DistributedSampler (seed + epoch) and can start in the middle of an epoch, and `SeededSamples` seeds
each sample's transform from `sample_seed`, so a resumed run loads bit-identical batches whichever worker
loads them.  `ShardSampler` splits a validation set over ranks so that every sample counts exactly once.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, get_worker_info


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of workers, ranks and resume point."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint32)[0])


class ResumableSampler(DistributedSampler):
    """DistributedSampler (its shuffle is a pure function of seed + epoch) that can start mid-epoch.

    It yields (index, sample_seed) pairs; `SeededSamples` seeds the RNGs with the second element before
    the transform runs.  So sample i of epoch e always gets the same crop and flip, whichever worker
    loads it and whether or not the run was resumed in the middle of the epoch: skipping the first
    `start` samples then gives bit-identical batches to an uninterrupted run.
    With one process (num_replicas=1) it is simply a seeded shuffle.
    """

    def __init__(self, dataset: Dataset, *, seed: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in list(super().__iter__())[self.start:]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples - self.start


@contextmanager
def _preserved_rng():
    """Restore the caller's torch / random / numpy generator states afterwards.

    Only needed in the main process (workers=0), where the same generators drive dropout and mixup;
    a DataLoader worker's generators serve nothing else.
    """
    if get_worker_info() is not None:
        yield
        return
    generator = torch.default_generator
    torch_state, py_state, np_state = generator.get_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededSamples(Dataset):
    """dataset[(index, seed)] = dataset[index] computed with torch / random / numpy seeded by `seed`.

    The DataLoader fetches a whole batch through `__getitems__`, so the caller's generator states are
    saved and restored once per batch, not once per sample.  A dataset that can take the seeds itself
    (`batch_seedable`, e.g. Fashion-MNIST's in-memory images) transforms the whole batch at once through
    `seeded_items` instead, leaving the global generators alone; a sample fetched alone goes the same way.
    `benchmarks/loader_speed.py` times that batched path against reseeding image by image.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _seeded_item(self, index: int, seed: int):
        # The CPU generator only: torch.manual_seed would also reseed every CUDA device, far slower per sample.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        return self.dataset[index]

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        if getattr(self.dataset, "batch_seedable", False):
            return self.dataset.seeded_items([index for index, _ in keys], [seed for _, seed in keys])
        with _preserved_rng():
            return [self._seeded_item(index, seed) for index, seed in keys]


class ShardSampler(Sampler[int]):
    """Rank r of W gets indices r, r + W, r + 2W, ...: every sample exactly once, no padding, no duplicates.

    (DistributedSampler pads the last shard with repeated samples, which would count some images twice.)
    """

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = range(rank, length, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
