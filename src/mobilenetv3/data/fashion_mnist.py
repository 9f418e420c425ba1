"""Fashion-MNIST (Xiao et al., 2017): 60000 train + 10000 test 28x28 grey images, 10 classes, held in memory.

The four idx files (`train-images-idx3-ubyte[.gz]`, ...) are looked for, in this order, in:
  1. `data_dir` (`--data-dir`),
  2. `$MOBILENETV3_DATA`,
  3. `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist` package: the files lie flat there),
  4. the download cache `files.cache_dir()`: `$MOBILENETV3_CACHE`, else `$XDG_CACHE_HOME/mobilenetv3`
     (default `~/.cache/mobilenetv3`),
each either flat, in a `fashion-mnist/` subfolder, or in torchvision's `FashionMNIST/raw/` layout.  When none
has them, `torchvision.datasets.FashionMNIST(download=True)` fetches them into `data_dir` (or the cache).
The idx files are parsed here (gzip + a 4-byte-per-dim header) into uint8 tensors: no copy on disk.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets import FashionMNIST

from ..errors import UserError, first_line
from ..files import cache_dir

logger = logging.getLogger(__name__)

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
#: Per-pixel mean and std of the 60000 training images, in [0, 1].
MEAN = (0.2860,)
STD = (0.3530,)
IMAGE_SIZE = 28
TRAIN_SAMPLES, TEST_SAMPLES = 60000, 10000
ENV_VAR = "MOBILENETV3_DATA"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: split -> (images file, labels file), without the optional ".gz"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: where the files may lie under a searched folder
SUBFOLDERS = (Path("."), Path("fashion-mnist"), Path("FashionMNIST") / "raw")


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def files_in(folder: Path) -> dict[str, Path] | None:
    """{stem: path} of the four idx files under `folder` (in one of `SUBFOLDERS`), or None."""
    for sub in SUBFOLDERS:
        found = {stem: _file_in(folder / sub, stem) for pair in FILES.values() for stem in pair}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def search_folders(data_dir: str | os.PathLike | None) -> list[Path]:
    """The folders searched, in order (`data_dir` must exist when given: a typo is an error, not a download)."""
    folders = []
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise UserError(f"data dir not found: {data_dir}")
        folders.append(data_dir)
    if os.environ.get(ENV_VAR):
        folders.append(Path(os.environ[ENV_VAR]).expanduser())
    folders += [DEBIAN_DIR, cache_dir()]
    return folders


def locate(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> dict[str, Path]:
    """{stem: path} of the idx files: the first searched folder that has all four, else a download."""
    folders = search_folders(data_dir)
    for folder in folders:
        found = files_in(folder)
        if found:
            logger.debug("Fashion-MNIST found in %s", found[FILES["train"][0]].parent)
            return found
    searched = ", ".join(str(folder) for folder in folders)
    target = Path(data_dir).expanduser() if data_dir is not None else cache_dir()
    if not download:
        raise UserError(f"Fashion-MNIST not found (searched {searched})")
    logger.info("Fashion-MNIST not found in %s; downloading it into %s", searched, target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; torchvision raises RuntimeError at the end
        raise UserError(
            f"Fashion-MNIST not found (searched {searched}) and the download into {target} failed "
            f"({first_line(error)}); "
            f"install Debian's dataset-fashion-mnist or put the four *-ubyte.gz files in --data-dir or ${ENV_VAR}"
        ) from None
    found = files_in(target)
    if not found:
        raise UserError(f"Fashion-MNIST download into {target} did not produce the four idx files")
    return found


def read_idx(path: Path) -> torch.Tensor:
    """A uint8 idx file (gzipped or not) as a tensor of the shape its header gives."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            data = handle.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {path}: {error}") from None
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(f"{path} is not a uint8 idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(shape) != ndim or len(data) - header != math.prod(shape):
        raise UserError(f"{path} is truncated or corrupt ({len(data) - header} data bytes for shape {shape})")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def load_split(files: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of "train" or "test"."""
    images_file, labels_file = (files[stem] for stem in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{images_file} and {labels_file} do not match: images {tuple(images.shape)}, labels {tuple(labels.shape)}"
        )
    if labels.numel() and int(labels.max()) >= len(CLASS_NAMES):
        raise UserError(f"{labels_file} has label {int(labels.max())}; Fashion-MNIST has {len(CLASS_NAMES)} classes")
    return images.unsqueeze(1), labels.long()


class InMemoryImages(Dataset):
    """(transform(image), label) from a uint8 [N, C, H, W] tensor held in memory (shared with forked workers).

    A DataLoader fetches a whole batch through `__getitems__`: a transform with `batched = True` (e.g.
    `SmallImageTrainTransform`) then runs once on [B, C, H, W] instead of B times.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], transform=None) -> None:
        self.images, self.labels, self.classes, self.transform = images, labels, list(classes), transform

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    @property
    def batch_seedable(self) -> bool:
        """Whether `seeded_items` can run (the transform draws from per-image seeds: `SmallImageTrainTransform`)."""
        return getattr(self.transform, "seedable", False)

    def seeded_items(self, indices: list[int], seeds: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Like `__getitems__`, with image k's random draws taken from seeds[k] alone (see `SeededSamples`)."""
        batch = self.transform.seeded(self.images[indices], seeds)
        return list(zip(batch, self.labels[indices].tolist()))

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        images = self.images[indices]
        if self.transform is None:
            batch = images
        elif getattr(self.transform, "batched", False):
            batch = self.transform(images)
        else:
            batch = [self.transform(image) for image in images]
        return list(zip(batch, self.labels[indices].tolist()))
