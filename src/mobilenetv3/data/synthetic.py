"""Random tensors for throughput runs: item i is a pure function of (split, i), whatever worker draws it.

Cheap enough never to be what a throughput run measures: each split draws one noise field a little larger than
an image and every label once, when it is built; item i is the field's window at an offset that steps with i
(consecutive items always differ; items `POSITIONS` apart repeat), and its label the i-th drawn.  An item is a
view of the field, not a copy (collating copies it once, into the batch): copy it before changing it in place.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

#: the split's field and labels are drawn from torch.Generator().manual_seed(split): val never repeats train.
TRAIN_SPLIT, VAL_SPLIT = 0, 1
#: how much larger than an image the noise field is on each side: (MARGIN + 1)**2 distinct windows
MARGIN = 31
POSITIONS = (MARGIN + 1) ** 2


class SyntheticImages(Dataset):
    """`num_samples` standard-normal images [in_chans, size, size] (already "normalised") with uniform labels."""

    def __init__(
        self, num_samples: int, num_classes: int, input_size: int, in_chans: int = 3, *, split: int = TRAIN_SPLIT
    ) -> None:
        self.num_samples, self.num_classes = num_samples, num_classes
        self.shape = (in_chans, input_size, input_size)
        self.split = split
        self.classes = [f"class_{index}" for index in range(num_classes)]
        generator = torch.Generator().manual_seed(split)
        self.field = torch.randn((in_chans, input_size + MARGIN, input_size + MARGIN), generator=generator)
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator, dtype=torch.int32)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        top, left = divmod(index % POSITIONS, MARGIN + 1)
        size = self.shape[-1]
        return self.field[:, top:top + size, left:left + size], int(self.labels[index])
