"""A folder in ImageNet layout (`train/<class>/*`, `val/<class>/*`) through a tolerant torchvision ImageFolder.

Any image mode (L, RGBA, P, CMYK, 16-bit "I;16", ...) is converted to RGB when it is read.  A file that can't
be decoded (truncated, empty, not an image) becomes a `None` item plus one warning naming the file, which
`collate_skipping` drops and counts; with `strict=True` it is a `UserError` instead.
`typical_image_size` reads the headers of a few files (no decoding) to tell how large the images are.
"""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError
from ..preprocessing import DECODE_ERRORS, ConvertMode, describe_decode_error

logger = logging.getLogger(__name__)

LAYOUT_HINT = "expected ImageNet layout: DIR/train/<class>/<image>, DIR/val/<class>/<image>"


class TolerantImageFolder(ImageFolder):
    """`torchvision.datasets.ImageFolder` that converts every image to `mode` and survives broken files.

    Items are `(transform(image), class_index)`, or `None` for a file that can't be decoded.  A transform that
    reads files itself (`reads_files`, the training pipeline of data/decode.py) is given the path instead of a
    decoded image: the decode errors of its `load` are caught, named and skipped alike, and its
    `augment_loaded` runs outside that net.  Hidden folders (".ipynb_checkpoints", ".git", ...) are not classes.  `broken_files` lists the paths
    this process has failed to read (each is warned about once per process).
    """

    def __init__(
        self, root: str | os.PathLike, transform: Callable | None = None, *, strict: bool = False, mode: str = "RGB"
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"image folder not found: {root} ({LAYOUT_HINT})")
        self.strict = strict
        self.convert = ConvertMode(mode)
        self.broken_files: set[str] = set()
        Image.init()  # register every PIL plugin once, before workers fork
        super().__init__(str(root), transform=transform, allow_empty=True)
        empty = sorted(set(self.classes) - {self.classes[target] for target in self.targets})
        if empty:
            raise UserError(
                f"class folder with no images: {_listed([str(root / name) for name in empty], 3)} "
                f"(supported extensions: {' '.join(IMG_EXTENSIONS)})"
            )

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        with os.scandir(directory) as entries:
            classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise UserError(f"no class folders in {directory} ({LAYOUT_HINT})")
        return classes, {name: index for index, name in enumerate(classes)}

    def read_image(self, path: str):
        """The decoded image in `self.convert`'s mode, or None (after one warning) when it can't be decoded."""
        return read_image(path, self.convert, strict=self.strict, broken_files=self.broken_files)

    def tolerant(self, path: str, load: Callable[[str], Any]):
        """`load(path)`, or None (after one warning naming the file; a UserError with `strict`) when it raises a
        decode error."""
        return decode_tolerantly(path, load, strict=self.strict, broken_files=self.broken_files)

    def finish_batch(self, images, targets, device):
        """A collated batch of the training pipeline as the model takes it (data/decode.py
        `FolderTrainTransform.finish_batch`): (images on `device`, targets, files dropped there and named here)."""
        return self.transform.finish_batch(images, targets, device, self.tolerant)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, target = self.samples[index]
        if getattr(self.transform, "reads_files", False):
            loaded = self.tolerant(path, self.transform.load)  # decoding only: what fails there is a broken file
            if loaded is None:
                return None
            image = self.transform.augment_loaded(loaded)
        else:
            image = self.read_image(path)
            if image is None:
                return None
            if self.transform is not None:
                image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def read_image(path: str, convert: Callable, *, strict: bool, broken_files: set[str]):
    """`convert(decoded image)`, or None when `path` can't be decoded: one warning naming the file the first time
    (it is added to `broken_files`), or a UserError with `strict`.  Shared by the classification, segmentation
    and detection folders."""
    def load(path: str):
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()  # decode now: truncation is only detected here
        return convert(image)

    return decode_tolerantly(path, load, strict=strict, broken_files=broken_files)


def decode_tolerantly(path: str, load: Callable[[str], Any], *, strict: bool, broken_files: set[str]):
    """`load(path)`, or None when it raises one of PIL's decode errors: one warning naming the file the first time
    (it is added to `broken_files`), or a UserError with `strict`."""
    try:
        return load(path)
    except DECODE_ERRORS as error:
        reason = describe_decode_error(path, error)
        if strict:
            raise UserError(f"unreadable image {path}: {reason} (drop --strict-data to skip such files)") from None
        if path not in broken_files:
            broken_files.add(path)
            logger.warning("skipping unreadable image %s: %s", path, reason)
        return None


def typical_image_size(folder: ImageFolder, count: int = 8) -> tuple[int, int] | None:
    """(width, height), the medians over `count` files spread evenly over the folder's samples (so every class
    is sampled when there are enough files); only the headers are read.  None when no sampled file opens.
    Files that can't be read are skipped silently: reading them properly warns about them."""
    samples = folder.samples
    if not samples:
        return None
    picks = sorted({round(i * (len(samples) - 1) / max(count - 1, 1)) for i in range(min(count, len(samples)))})
    sizes = []
    for index in picks:
        try:
            with Image.open(samples[index][0]) as image:  # lazy: the header only, no pixel data
                sizes.append(image.size)
        except DECODE_ERRORS:
            continue
    if not sizes:
        return None
    return int(statistics.median_low(w for w, _ in sizes)), int(statistics.median_low(h for _, h in sizes))


def _listed(names: list[str], most: int) -> str:
    """'a, b, c and 4 more'."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_same_classes(train: TolerantImageFolder, val: TolerantImageFolder) -> None:
    """Val must have exactly the train classes (same names, hence the same label indices)."""
    if train.classes == val.classes:
        return
    missing = sorted(set(train.classes) - set(val.classes))
    extra = sorted(set(val.classes) - set(train.classes))
    parts = []
    if missing:
        parts.append(f"missing in {val.root}: {_listed(missing, 5)}")
    if extra:
        parts.append(f"not in {train.root}: {_listed(extra, 5)}")
    raise UserError(f"val classes differ from train classes ({'; '.join(parts)})")


def split_dirs(root: str | os.PathLike, *, need_train: bool) -> tuple[Path | None, Path]:
    """(train_dir or None, val_dir) of an ImageNet-layout folder, with a one-line error for what is missing."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"--data {root} is a file; give 'fashion-mnist', 'synthetic' or a folder ({LAYOUT_HINT})")
    if not root.is_dir():
        raise UserError(f"data folder not found: {root} (use 'fashion-mnist', 'synthetic' or a folder; {LAYOUT_HINT})")
    wanted = ("train", "val") if need_train else ("val",)
    missing = [name for name in wanted if not (root / name).is_dir()]
    if missing:
        raise UserError(f"{root} has no {' or '.join(f'{name}/' for name in missing)} folder ({LAYOUT_HINT})")
    return (root / "train" if need_train else None), root / "val"
