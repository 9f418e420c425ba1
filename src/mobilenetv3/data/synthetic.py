"""Random tensors for throughput runs: item i is a pure function of (split, i), whatever worker draws it."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

#: item i of a split is drawn from torch.Generator().manual_seed(2 * i + split): val never repeats train.
#: (Offsets of 2**32 or more would not do: the CPU generator keeps only the low 32 bits of a seed.)
TRAIN_SPLIT, VAL_SPLIT = 0, 1


class SyntheticImages(Dataset):
    """`num_samples` standard-normal images [in_chans, size, size] (already "normalised") with uniform labels."""

    def __init__(
        self, num_samples: int, num_classes: int, input_size: int, in_chans: int = 3, *, split: int = TRAIN_SPLIT
    ) -> None:
        self.num_samples, self.num_classes = num_samples, num_classes
        self.shape = (in_chans, input_size, input_size)
        self.split = split
        self.classes = [f"class_{index}" for index in range(num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        generator = torch.Generator().manual_seed(2 * index + self.split)
        label = int(torch.randint(self.num_classes, (), generator=generator))
        return torch.randn(self.shape, generator=generator), label
