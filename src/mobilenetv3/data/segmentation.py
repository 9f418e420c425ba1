"""Segmentation data: images with masks of class indices (255 = ignore), from three sources.

Items are `(image float32 [C, H, W] normalised, mask int64 [H, W])`, transformed together by
`transforms.SegmentationTransform`, or `None` for an image that can't be decoded (one warning naming the file,
as for classification folders; `collate_skipping` drops and counts it).

1. A folder (`--data DIR`, detected by `DIR/train/images` + `DIR/train/masks`, or `val/` for evaluation):

       DIR/classes.txt              optional: one class name per line, line k names class k
       DIR/{train,val}/images/*.jpg|png|...
       DIR/{train,val}/masks/<image stem>.png   single-channel (L or P) PNG of class indices, 255 = ignore

   Without classes.txt the class count is 1 + the largest class index found in any mask (a scan that reads
   every mask once), and the classes are named class_0, class_1, ...  A missing mask, a mask whose size
   differs from its image's, and a mask value at or beyond the class count other than 255 are each a
   `UserError` whose one line names the file.
2. Pascal VOC 2012 (`--data voc:PATH`, or a folder holding `VOCdevkit/VOC2012`): read through
   `torchvision.datasets.VOCSegmentation(PATH, year="2012", image_set=..., download=False)`, its "train" and
   "val" lists, with the 21 VOC class names (`VOC_CLASSES`).  Nothing is downloaded.
3. `--data fashion-mnist-seg`: OUR synthetic-composite set, not a public benchmark; numbers on it compare
   only with numbers on it.  Each 128x128 grey canvas holds 1-4 Fashion-MNIST items, each scaled 1.5-3x
   (bilinear) and placed at a random position fully inside the canvas; items may overlap, later ones on top.
   The mask labels each item's own pixels brighter than `CANVAS_THRESHOLD` with its class + 1 (0 is the
   background: 11 classes, `CANVAS_CLASSES`); so a pixel is labelled exactly when the canvas is brighter than
   the threshold there, with the class of the topmost item bright there.  Train canvases use only the 60000
   training items, val canvases only the 10000 test items.  `make_canvases` generates them from a seed,
   deterministically and vectorised (a few batched ops per item size), and they are held in memory;
   `write_folder` writes them in the folder layout above when asked.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError, first_line
from ..preprocessing import DECODE_ERRORS, ConvertMode, describe_decode_error
from ..weights import published
from . import fashion_mnist
from .folder import read_image
from .transforms import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: a mask may name classes 0..254: 255 is the ignore value
MAX_CLASSES = 255
SEGMENTATION_HINT = ("expected DIR/train/images/*.jpg|png with DIR/train/masks/<same name>.png of class indices "
                     "(255 = ignore), the same under DIR/val/, and optionally DIR/classes.txt")
#: Pascal VOC's 21 classes, as torchvision's weights name them (one list: the published-weights table's)
VOC_CLASSES = list(published.VOC_CLASSES)
CANVAS_CLASSES = ["background", *fashion_mnist.CLASS_NAMES]
CANVAS_SIZE = 128
CANVAS_MAX_ITEMS = 4
CANVAS_SCALE = (1.5, 3.0)
#: an item pixel belongs to the item's mask when brighter than this (of 255), after scaling
CANVAS_THRESHOLD = 20
#: per-pixel mean and std of the 10000 default train canvases (canvas_seed 0), in [0, 1]: the canvases' own
#: statistics, darker than Fashion-MNIST's items since about three quarters of a canvas is background
CANVAS_MEAN = (0.1403,)
CANVAS_STD = (0.2767,)
#: the `seed` entropy's second word: train and val canvases come from different streams
CANVAS_SPLITS = {"train": 0, "val": 1}
#: `Canvases.owners` where no item is brighter than the threshold (the mask's background)
NO_OWNER = 255


# --- folders and VOC --------------------------------------------------------------------------------------------


def read_class_names(path: Path) -> list[str]:
    """Class names from a classes.txt, line k naming class k (trailing blank lines are ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {first_line(error)}") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise UserError(f"{path} names no classes (one class name per line)")
    if "" in names:
        raise UserError(f"{path} line {names.index('') + 1} is empty (one class name per line, line k names class k)")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{path} names {len(names)} classes; masks hold at most {MAX_CLASSES} (255 means ignore)")
    repeated = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if repeated is not None:
        raise UserError(f"{path} names {repeated!r} on lines {names.index(repeated) + 1} and "
                        f"{names.index(repeated, names.index(repeated) + 1) + 1} (each class once)")
    return names


def is_segmentation_folder(root: str | os.PathLike) -> bool:
    """Whether `root` has the segmentation layout: train/ or val/ holding both images/ and masks/."""
    root = Path(root).expanduser()
    return any((root / split / "images").is_dir() and (root / split / "masks").is_dir() for split in ("train", "val"))


def voc_root(value: str) -> Path | None:
    """The folder to give VOCSegmentation (the one holding VOCdevkit/VOC2012) for `--data voc:PATH`, or for a
    plain folder holding VOCdevkit/VOC2012; None when `value` is neither.  PATH may also be the VOCdevkit or the
    VOC2012 folder itself."""
    explicit = value.startswith("voc:")
    path = Path(value[4:] if explicit else value).expanduser()
    candidates = [path]
    if path.name == "VOCdevkit":
        candidates.append(path.parent)
    if path.name == "VOC2012" and path.parent.name == "VOCdevkit":
        candidates.append(path.parent.parent)
    for candidate in candidates:
        if (candidate / "VOCdevkit" / "VOC2012").is_dir():
            return candidate
    if explicit:
        raise UserError(f"no Pascal VOC 2012 under {path} (expected {path}/VOCdevkit/VOC2012 with JPEGImages/, "
                        "SegmentationClass/ and ImageSets/Segmentation/)")
    return None


def read_mask(path: str, image_size: tuple[int, int], image_path: str, num_classes: int) -> torch.Tensor:
    """The mask at `path` as uint8 [H, W], checked against its image's (width, height) and the class count."""
    try:
        with Image.open(path) as mask:
            mask.load()
            mode, size = mask.mode, mask.size
            values = np.asarray(mask) if mode in ("L", "P") else None
    except DECODE_ERRORS as error:
        raise UserError(f"unreadable mask {path}: {describe_decode_error(path, error)}") from None
    if values is None:
        raise UserError(f"mask {path} has mode {mode}; masks are single-channel (L or P) PNGs of class indices, "
                        "255 = ignore")
    if size != image_size:
        raise UserError(f"mask {path} is {size[0]}x{size[1]} but its image {image_path} is "
                        f"{image_size[0]}x{image_size[1]}; they must be the same size")
    labels = values[values != IGNORE_INDEX]
    if labels.size and int(labels.max()) >= num_classes:
        raise UserError(f"mask {path} has class index {int(labels.max())} but the data has {num_classes} classes "
                        f"(0..{num_classes - 1}; 255 = ignore)")
    return torch.from_numpy(values.copy())


class MaskedImages(Dataset):
    """(image, mask) file pairs -> `transform(image uint8 [C, H, W], mask uint8 [H, W])`, or None for an
    image that can't be decoded (warned about once, or a UserError with `strict`).  A bad mask is a UserError.

    `samples` lists the (image path, mask path) pairs; `classes` the class names; `broken_files` the images this
    process failed to read.
    """

    def __init__(self, samples: Sequence[tuple[str, str]], classes: Sequence[str], transform: Callable | None = None,
                 *, strict: bool = False, mode: str = "RGB") -> None:
        self.samples, self.classes, self.transform = list(samples), list(classes), transform
        self.strict, self.convert = strict, ConvertMode(mode)
        self.broken_files: set[str] = set()
        Image.init()  # register every PIL plugin once, before workers fork

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(image uint8 [C, H, W], mask uint8 [H, W]) as stored, checked; None for an undecodable image."""
        image_path, mask_path = self.samples[index]
        image = read_image(image_path, self.convert, strict=self.strict, broken_files=self.broken_files)
        if image is None:
            return None
        mask = read_mask(mask_path, image.size, image_path, len(self.classes))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        return pixels.contiguous(), mask

    def __getitem__(self, index: int):
        loaded = self.load(index)
        if loaded is None or self.transform is None:
            return loaded
        return self.transform(*loaded)


def folder_samples(split_dir: Path) -> list[tuple[str, str]]:
    """(image, mask) path pairs of `split_dir/images/*` and `split_dir/masks/<stem>.png`, sorted by image name."""
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise UserError(f"{split_dir} has no {folder.name}/ folder ({SEGMENTATION_HINT})")
    extensions = tuple(IMG_EXTENSIONS)
    images = sorted(entry.path for entry in os.scandir(images_dir)
                    if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(extensions))
    if not images:
        raise UserError(f"no images in {images_dir} (supported extensions: {' '.join(IMG_EXTENSIONS)})")
    samples = []
    for image in images:
        mask = masks_dir / (Path(image).stem + ".png")
        if not mask.is_file():
            raise UserError(f"missing mask {mask} for image {image} ({SEGMENTATION_HINT})")
        samples.append((image, str(mask)))
    return samples


def scan_class_count(samples: Sequence[tuple[str, str]]) -> int:
    """1 + the largest class index (not 255) in the masks: the class count of a folder without classes.txt."""
    largest = 0
    for _, mask_path in samples:
        try:
            with Image.open(mask_path) as mask:
                values = np.asarray(mask)
        except DECODE_ERRORS as error:
            raise UserError(f"unreadable mask {mask_path}: {describe_decode_error(mask_path, error)}") from None
        labels = values[values != IGNORE_INDEX]
        if labels.size:
            largest = max(largest, int(labels.max()))
    return largest + 1


def segmentation_folders(root: str | os.PathLike, *, need_train: bool, transforms: tuple[Callable | None, Callable],
                         strict: bool = False, mode: str = "RGB", class_names: Sequence[str] | None = None,
                         ) -> tuple[MaskedImages | None, MaskedImages]:
    """(train or None, val) of a segmentation folder; transforms = (train transform, val transform).  The classes
    come from classes.txt, else `class_names` (a checkpoint's), else the masks' largest class index."""
    root = Path(root).expanduser()
    wanted = ("train", "val") if need_train else ("val",)
    missing = [split for split in wanted if not (root / split).is_dir()]
    if missing:
        raise UserError(f"{root} has no {' or '.join(f'{split}/' for split in missing)} folder ({SEGMENTATION_HINT})")
    samples = {split: folder_samples(root / split) for split in wanted}
    if (root / "classes.txt").is_file():
        classes = read_class_names(root / "classes.txt")
    elif class_names is not None:
        classes = list(class_names)
    else:
        count = scan_class_count([pair for pairs in samples.values() for pair in pairs])
        logger.info("%s has no classes.txt: %d classes, from the largest class index in its masks", root, count)
        classes = [f"class_{index}" for index in range(count)]
    val = MaskedImages(samples["val"], classes, transforms[1], strict=strict, mode=mode)
    train = MaskedImages(samples["train"], classes, transforms[0], strict=strict, mode=mode) if need_train else None
    return train, val


def voc_datasets(root: Path, *, need_train: bool, transforms: tuple[Callable | None, Callable],
                 strict: bool = False) -> tuple[MaskedImages | None, MaskedImages]:
    """(train or None, val) of Pascal VOC 2012 under `root`, listed by torchvision's VOCSegmentation."""
    from torchvision.datasets import VOCSegmentation

    def split(image_set: str, transform: Callable | None) -> MaskedImages:
        try:
            voc = VOCSegmentation(str(root), year="2012", image_set=image_set, download=False)
        except (OSError, RuntimeError) as error:
            raise UserError(
                f"cannot read Pascal VOC 2012's {image_set} list under {root}: {first_line(error)}") from None
        for image, mask in zip(voc.images, voc.masks):
            if not os.path.isfile(mask):
                raise UserError(f"missing mask {mask} for image {image}")
        return MaskedImages(list(zip(voc.images, voc.masks)), VOC_CLASSES, transform, strict=strict)

    return (split("train", transforms[0]) if need_train else None), split("val", transforms[1])


# --- fashion-mnist-seg canvases ------------------------------------------------------------------------------


@dataclass
class Canvases:
    """Generated canvases and what they are made of (item k of a canvas is drawn over items 0..k-1)."""

    images: torch.Tensor  # uint8 [N, 1, S, S]
    masks: torch.Tensor  # uint8 [N, S, S], 0 = background, class + 1 where an item is brighter than the threshold
    items: torch.Tensor  # int64 [N, MAX_ITEMS]: indices into the source items, -1 where a canvas has fewer
    boxes: torch.Tensor  # int64 [N, MAX_ITEMS, 4]: (x0, y0, x1, y1) of each scaled item's square, 0 where unused
    #: uint8 [N, S, S] (only when make_canvases is asked for it): which item (its slot k in `items`) the mask
    #: labels each pixel for, i.e. the topmost item brighter than the threshold there; NO_OWNER where none is
    owners: torch.Tensor | None = None
    #: int64 [N, MAX_ITEMS] (with `owners`): each item's pixels brighter than the threshold as drawn, before later
    #: items cover any of them; 0 where unused
    areas: torch.Tensor | None = None


def make_canvases(items: torch.Tensor, labels: torch.Tensor, count: int, seed: int | Sequence[int], *,
                  size: int = CANVAS_SIZE, max_items: int = CANVAS_MAX_ITEMS,
                  scale: tuple[float, float] = CANVAS_SCALE, threshold: int = CANVAS_THRESHOLD,
                  owners: bool = False) -> Canvases:
    """`count` canvases from `items` (uint8 [M, h, w] or [M, 1, h, w]) and their `labels` (class indices [M]).

    Everything random comes from `numpy.random.default_rng(seed)`: the same arguments give identical canvases.
    Each canvas gets 1..max_items items (uniform); the items are taken in the order of successive random
    permutations of all M, so each is used about equally often; each is scaled by a factor uniform in `scale`
    to a square side round(h * factor) and placed uniformly at random fully inside the canvas.  Drawing item k
    writes its pixels brighter than `threshold` (image and mask: it covers what was there) and, elsewhere, the
    brighter of its pixel and the canvas's (so faint edges stay faint and labels stay where the image is bright).
    With `owners`, `Canvases.owners` also says which item each labelled pixel belongs to and `Canvases.areas` how
    many pixels each item drew brighter than the threshold (fashion-mnist-det's boxes); nothing else changes.
    """
    items = items.reshape(items.shape[0], 1, *items.shape[-2:])
    labels = torch.as_tensor(labels).long()
    total, height = items.shape[0], items.shape[-2]
    if total == 0:
        raise ValueError("make_canvases needs at least one item")
    rng = np.random.default_rng(seed)
    per_canvas = rng.integers(1, max_items + 1, count)
    factors = rng.uniform(scale[0], scale[1], (count, max_items))
    sides = np.minimum(np.rint(height * factors).astype(np.int64), size)
    corners = (rng.random((count, max_items, 2)) * (size - sides[..., None] + 1)).astype(np.int64)  # (y, x)
    used = np.arange(max_items)[None, :] < per_canvas[:, None]
    picks = np.concatenate([rng.permutation(total) for _ in range(-(-int(used.sum()) // total))])
    chosen = np.full((count, max_items), -1, dtype=np.int64)
    chosen[used] = picks[: int(used.sum())]  # row-major: canvas by canvas, back to front

    # One thread: these ops are small and many (about 40 item sizes x 4 layers), and run 2.4x faster on one
    # thread than on two on a 2-core machine (10000 canvases: 1.9 s against 4.4 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, masks, owner, areas = _draw(items, labels, count, size, sides, corners, used, chosen, threshold,
                                            owners)
    finally:
        torch.set_num_threads(threads)
    boxes = np.stack([corners[..., 1], corners[..., 0], corners[..., 1] + sides, corners[..., 0] + sides], axis=-1)
    boxes[~used] = 0
    return Canvases(images, masks, torch.from_numpy(chosen), torch.from_numpy(boxes), owner, areas)


def _draw(items: torch.Tensor, labels: torch.Tensor, count: int, size: int, sides: np.ndarray, corners: np.ndarray,
          used: np.ndarray, chosen: np.ndarray, threshold: int, owners: bool = False,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """make_canvases' drawing: (images uint8 [count, 1, size, size], masks uint8 [count, size, size], and with
    `owners` the owners uint8 [count, size, size] and areas int64 [count, max_items], else None, None)."""
    images = torch.zeros(count * size * size, dtype=torch.uint8)  # flat: one index per pixel written
    masks = torch.zeros(count * size * size, dtype=torch.uint8)
    owner = torch.full((count * size * size,), NO_OWNER, dtype=torch.uint8) if owners else None
    areas = np.zeros(used.shape, dtype=np.int64) if owners else None
    steps = torch.arange(size)
    for layer in range(used.shape[1]):  # back to front; a canvas has at most one item per layer
        for side in np.unique(sides[used[:, layer], layer]).tolist():
            canvas = np.flatnonzero(used[:, layer] & (sides[:, layer] == side))
            source = torch.from_numpy(chosen[canvas, layer])
            scaled = nnf.interpolate(items[source].float(), size=(side, side), mode="bilinear", align_corners=False)
            scaled = scaled[:, 0].add_(0.5).to(torch.uint8)  # round half up (bilinear stays within 0..255)
            top, left = corners[canvas, layer, 0], corners[canvas, layer, 1]
            first = torch.from_numpy(canvas * size * size + top * size + left)
            where = first[:, None, None] + (steps[:side, None] * size + steps[:side])
            bright = scaled > threshold
            # bright item pixels cover the canvas; elsewhere the brighter of the two stays
            images[where] = torch.maximum(images[where] * ~bright, scaled)
            masks[where] = torch.where(bright, (labels[source] + 1).to(torch.uint8)[:, None, None], masks[where])
            if owner is not None:  # the same rule as the mask's: a bright pixel takes this item's slot
                owner[where[bright]] = layer
                areas[canvas, layer] = bright.flatten(1).sum(1).numpy()
    if owner is None:
        return images.view(count, 1, size, size), masks.view(count, size, size), None, None
    return images.view(count, 1, size, size), masks.view(count, size, size), owner.view(count, size, size), \
        torch.from_numpy(areas)


class CanvasSegmentation(Dataset):
    """fashion-mnist-seg canvases held in memory: item i is `transform(images[i], masks[i])`.

    `canvases` keeps what they were made of (`items`: indices into the source split's items, `boxes`);
    `source` names that split ("train" or "test").
    """

    def __init__(self, canvases: Canvases, source: str, transform: Callable | None = None) -> None:
        self.canvases, self.source, self.transform = canvases, source, transform
        self.classes = list(CANVAS_CLASSES)

    def __len__(self) -> int:
        return self.canvases.images.shape[0]

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image uint8 [1, S, S], mask uint8 [S, S]) untransformed, as `MaskedImages.load` gives its pairs."""
        return self.canvases.images[index], self.canvases.masks[index]

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        return (image, mask) if self.transform is None else self.transform(image, mask)


def fashion_mnist_canvases(split: str, count: int, seed: int, data_dir: str | os.PathLike | None = None,
                           transform: Callable | None = None) -> CanvasSegmentation:
    """`count` canvases of "train" (from the 60000 training items) or "val" (from the 10000 test items)."""
    source = "train" if split == "train" else "test"
    items, labels = fashion_mnist.load_split(fashion_mnist.locate(data_dir), source)
    canvases = make_canvases(items, labels, count, [seed, CANVAS_SPLITS[split]])
    return CanvasSegmentation(canvases, source, transform)


def write_folder(root: str | os.PathLike, splits: dict[str, CanvasSegmentation | MaskedImages],
                 classes: Sequence[str]) -> Path:
    """Write datasets (untransformed) in the segmentation folder layout: root/<split>/images/<i>.png,
    root/<split>/masks/<i>.png and root/classes.txt; `--data root` then reads the same pixels back."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
    for split, dataset in splits.items():
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        digits = len(str(max(len(dataset) - 1, 0)))
        for index in range(len(dataset)):
            loaded = dataset.load(index)  # None: an image MaskedImages cannot decode
            if loaded is None:
                continue
            image, mask = loaded
            pixels = image.permute(1, 2, 0).numpy()
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
                root / split / "images" / f"{index:0{digits}d}.png")
            Image.fromarray(mask.numpy()).save(root / split / "masks" / f"{index:0{digits}d}.png")
    return root
