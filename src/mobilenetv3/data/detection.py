"""Detection data: images with boxes and class labels, from two sources.

Items are `(image, target)`, transformed together by `transforms.DetectionTransform`: the image float32
[C, H, W] in [0, 1] and NOT normalised (the detector normalises and resizes it itself, as torchvision's do), the
target {"boxes": float32 [N, 4] xyxy in the image's pixels, "labels": int64 [N], "image_id": int}, plus
"iscrowd" int64 [N] in evaluation targets; or `None` for an image that can't be decoded (one warning naming the
file, as for classification folders; `collate_skipping` drops and counts it).  Label 0 is the background and
labels no box; `num_classes` counts it.

1. A COCO-format folder (`--data coco:DIR`, or `--data DIR` when DIR/annotations/ holds instances_*.json):

       DIR/annotations/instances_train.json    DIR/train/<file_name of each image>
       DIR/annotations/instances_val.json      DIR/val/<file_name>

   or COCO 2017's own names, `instances_train2017.json` with `train2017/` and `instances_val2017.json` with
   `val2017/` (generally `instances_<split><digits>.json` with `DIR/<split><digits>/`; the plain name wins, else
   the largest such name).  Evaluation needs only the val pair.  Read with pycocotools through
   `torchvision.datasets.CocoDetection` and `torchvision.datasets.wrap_dataset_for_transforms_v2` (the target
   keys boxes, labels, image_id, iscrowd).  The classes are torchvision's COCO convention: a box's label is its
   category id itself, `num_classes` is the largest category id + 1, class k is named after category k,
   "__background__" at 0 and "N/A" at ids no category uses (COCO 2017: 91 classes).  A category id 0 (the
   background's), a missing or unparsable JSON, an annotation naming an unknown category, a non-integer id
   (image id, annotation id, `image_id`, `category_id`; a JSON true/false is not an integer), an `iscrowd` other
   than 0 or 1 and an image id listed twice are each a `UserError` whose one line names the file and the entry;
   train and val must name the same categories.  pycocotools missing is a `UserError` too
   (`require_pycocotools`, `PYCOCOTOOLS_HINT`).
   - Images without annotations are kept, as negatives (no boxes).
   - Crowd annotations (`iscrowd` 1) are kept in evaluation targets, with "iscrowd", for the metric to ignore
     (as COCO's evaluation does); training targets drop them, as torchvision's detection reference trains
     without them.  A missing `iscrowd` counts as 0.
   - An image file that can't be decoded (or is missing) is skipped and named once, as in classification
     folders (`--strict-data`: an error instead).
2. `--data fashion-mnist-det`: OUR synthetic-composite set, not a public benchmark; numbers on it compare only
   with numbers on it.  The canvases are exactly fashion-mnist-seg's (`segmentation.make_canvases`, the same
   seeds, `data.canvas_*` settings and train/val split: train canvases from the 60000 training items, val
   canvases from the 10000 test items), each item with a box instead of a mask, label = its class + 1
   (`CANVAS_CLASSES`, "background" at 0: 11 classes).  Occlusion, exactly:
   - an item's *visible pixels* are those the segmentation mask labels because of it: the pixels where it is
     the topmost item brighter than `CANVAS_THRESHOLD` (`Canvases.owners`);
   - its box is the tight box of its visible pixels, (x0, y0, x1, y1) = (first column, first row, last column
     + 1, last row + 1): pixel (x, y) covers [x, x + 1) x [y, y + 1), so the box covers those pixels exactly;
   - an item with no visible pixel (hidden entirely, or never brighter than the threshold) has no box;
   - an item with fewer visible pixels than `CANVAS_MIN_VISIBLE` (a quarter) of its own bright pixels (as drawn,
     before later items covered any) is a crowd box ("iscrowd" 1): a region evaluation ignores, left out of
     training targets, rather than a sliver to be found;
   so the items' visible-pixel sets are disjoint and together cover exactly the mask's non-zero pixels, while
   their boxes (the tight boxes of those sets) may overlap.  Generated in memory from the seed, deterministically
   (10000 canvases and their boxes in about 4 s on one core).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2

from ..errors import UserError, first_line
from ..preprocessing import ConvertMode
from . import fashion_mnist
from .folder import read_image
from .segmentation import CANVAS_CLASSES, CANVAS_SPLITS, Canvases, make_canvases

logger = logging.getLogger(__name__)

#: an occluded item shows at least this fraction of its own bright pixels, else its box is a crowd box
CANVAS_MIN_VISIBLE = 0.25
COCO_HINT = ("expected DIR/annotations/instances_train.json with its images in DIR/train/ and "
             "DIR/annotations/instances_val.json with DIR/val/, or COCO 2017's instances_train2017.json with "
             "train2017/ and instances_val2017.json with val2017/")
#: the class names of the background and of ids no category uses (torchvision's COCO class list)
BACKGROUND, UNUSED = "__background__", "N/A"
#: what the v2 wrapper returns of a CocoDetection target
TARGET_KEYS = ("boxes", "labels", "image_id", "iscrowd")
#: how to install pycocotools, which reading COCO-format annotations and COCO's mAP need
PYCOCOTOOLS_HINT = "pip install pycocotools (or pip install 'mobilenetv3[detection]')"


def require_pycocotools(what: str) -> None:
    """Raise a one-line `UserError` "<what> needs pycocotools: <PYCOCOTOOLS_HINT>" when pycocotools is not
    installed (looked up without importing it)."""
    if importlib.util.find_spec("pycocotools") is None:
        raise UserError(f"{what} needs pycocotools: {PYCOCOTOOLS_HINT}")


def _xyxy(boxes: torch.Tensor, canvas_size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(boxes.to(torch.float32).reshape(-1, 4), format=tv_tensors.BoundingBoxFormat.XYXY,
                                    canvas_size=canvas_size)


# --- fashion-mnist-det canvases -----------------------------------------------------------------------------


def visible_boxes(canvases: Canvases) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes int64 [N, K, 4], visible int64 [N, K]) from `canvases.owners`: the tight box (x0, y0, x1, y1),
    exclusive ends, of the pixels each item owns, and how many it owns; zeros where it owns none.

    An item owns pixels inside its own square only, so each is looked for there, a few batched ops per item
    size (as make_canvases draws them)."""
    if canvases.owners is None:
        raise ValueError("visible_boxes needs canvases made with make_canvases(..., owners=True)")
    count, size = canvases.owners.shape[0], canvases.owners.shape[-1]
    slots = canvases.items.shape[1]
    flat = canvases.owners.reshape(-1)
    squares = canvases.boxes.numpy()
    sides = squares[..., 2] - squares[..., 0]
    used = canvases.items.numpy() >= 0
    boxes = torch.zeros(count, slots, 4, dtype=torch.int64)
    visible = torch.zeros(count, slots, dtype=torch.int64)
    steps = torch.arange(size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: faster on one thread (see make_canvases)
    try:
        for slot in range(slots):
            for side in np.unique(sides[used[:, slot], slot]).tolist():
                canvas = np.flatnonzero(used[:, slot] & (sides[:, slot] == side))
                left = torch.from_numpy(squares[canvas, slot, 0])
                top = torch.from_numpy(squares[canvas, slot, 1])
                first = torch.from_numpy(canvas) * size * size + top * size + left
                own = flat[first[:, None, None] + (steps[:side, None] * size + steps[:side])] == slot
                rows = own.any(2).to(torch.uint8)  # [n, side]: argmax finds the first 1
                cols = own.any(1).to(torch.uint8)
                index = torch.from_numpy(canvas)
                visible[index, slot] = own.view(torch.uint8).sum((1, 2), dtype=torch.int64)
                boxes[index, slot] = torch.stack([left + cols.argmax(1), top + rows.argmax(1),
                                                  left + side - cols.flip(1).argmax(1),
                                                  top + side - rows.flip(1).argmax(1)], dim=1)
    finally:
        torch.set_num_threads(threads)
    boxes[visible == 0] = 0
    return boxes, visible


class CanvasDetection(Dataset):
    """fashion-mnist-det canvases held in memory: item i is `transform(image uint8 [1, S, S], target)`, the
    target holding canvas i's boxes in slot order (back to front), "iscrowd" and "image_id" i.

    `canvases` keeps what they were made of (its masks are fashion-mnist-seg's; `owners` is dropped once the
    boxes are made); `source` names the Fashion-MNIST split ("train" or "test"); `boxes`, `labels`, `iscrowd`
    are [N, K, 4] / [N, K] per item slot, and `kept` [N, K] says which slots have a box.
    """

    def __init__(self, canvases: Canvases, item_labels: torch.Tensor, source: str, transform: Callable | None = None,
                 *, min_visible: float = CANVAS_MIN_VISIBLE) -> None:
        boxes, visible = visible_boxes(canvases)
        used = canvases.items >= 0
        self.kept = used & (visible > 0)
        self.boxes = boxes.to(torch.float32)
        self.labels = torch.where(used, torch.as_tensor(item_labels).long()[canvases.items.clamp(min=0)] + 1, 0)
        self.iscrowd = ((visible.double() < min_visible * canvases.areas.double()) & self.kept).long()
        self.canvases = replace(canvases, owners=None)
        self.source, self.transform = source, transform
        self.classes = list(CANVAS_CLASSES)

    def __len__(self) -> int:
        return self.canvases.images.shape[0]

    def load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """(image uint8 [1, S, S], target with tv_tensors boxes) untransformed."""
        image = self.canvases.images[index]
        kept = self.kept[index]
        return image, {"boxes": _xyxy(self.boxes[index][kept], tuple(image.shape[-2:])),
                       "labels": self.labels[index][kept], "iscrowd": self.iscrowd[index][kept],
                       "image_id": int(index)}

    def __getitem__(self, index: int):
        image, target = self.load(index)
        return (image, target) if self.transform is None else self.transform(image, target)


def fashion_mnist_boxes(split: str, count: int, seed: int, data_dir: str | os.PathLike | None = None,
                        transform: Callable | None = None) -> CanvasDetection:
    """`count` fashion-mnist-det canvases of "train" (from the 60000 training items) or "val" (from the 10000
    test items): the same canvases as `segmentation.fashion_mnist_canvases(split, count, seed, ...)`."""
    source = "train" if split == "train" else "test"
    items, labels = fashion_mnist.load_split(fashion_mnist.locate(data_dir), source)
    canvases = make_canvases(items, labels, count, [seed, CANVAS_SPLITS[split]], owners=True)
    return CanvasDetection(canvases, labels, source, transform)


# --- COCO-format folders ------------------------------------------------------------------------------------


def coco_files(root: Path, split: str) -> tuple[Path, Path] | None:
    """(annotation file, image folder) of `split` under `root` (see the module docstring), or None."""
    folder = root / "annotations"
    if not folder.is_dir():
        return None
    pattern = re.compile(rf"instances_({re.escape(split)}\d*)\.json")
    names = sorted(match.group(1) for entry in folder.iterdir() if (match := pattern.fullmatch(entry.name)))
    if not names:
        return None
    name = split if split in names else names[-1]
    if len(names) > 1:
        logger.info("%s: using instances_%s.json (of %s)", folder, name, ", ".join(names))
    return folder / f"instances_{name}.json", root / name


def coco_root(value: str) -> Path | None:
    """The folder of `--data coco:PATH`, or of a plain folder whose annotations/ holds instances_train*.json or
    instances_val*.json; None when `value` is neither."""
    explicit = value.startswith("coco:")
    path = Path(value[5:] if explicit else value).expanduser()
    if any(coco_files(path, split) is not None for split in ("train", "val")):
        return path
    if explicit:
        raise UserError(f"no COCO-format annotations under {path} ({COCO_HINT})")
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_coco_json(path: Path) -> dict[str, Any]:
    """The instances file at `path`, checked, with `iscrowd` 0 filled in where missing: one-line UserErrors
    name the file (and the entry) for what would otherwise fail later or silently."""
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except OSError as error:
        raise UserError(f"cannot read COCO annotations {path}: {first_line(error)} ({COCO_HINT})") from None
    except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
        raise UserError(f"COCO annotations {path} are not valid JSON: {first_line(error)}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(key, []), list)
                                             for key in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO instances file (a JSON object with 'images', 'annotations' and "
                        "'categories' lists)")
    categories = data.get("categories") or []
    if not categories:
        raise UserError(f"{path} names no categories (COCO 'categories': [{{\"id\": 1, \"name\": ...}}, ...])")
    seen: set[int] = set()
    for index, category in enumerate(categories):
        if not (isinstance(category, dict) and _is_int(category.get("id")) and isinstance(category.get("name"), str)):
            raise UserError(f"{path}: categories[{index}] needs an integer 'id' and a string 'name'")
        number = category["id"]
        if number == 0:
            raise UserError(f"{path}: category {category['name']!r} has id 0, the background's; COCO category ids "
                            "start at 1")
        if number < 0 or number in seen:
            raise UserError(f"{path}: category id {number} is {'negative' if number < 0 else 'used twice'}")
        seen.add(number)
    image_ids: dict[int, int] = {}  # image id -> its index in 'images'
    for index, image in enumerate(data.get("images", [])):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise UserError(f"{path}: images[{index}] needs an 'id' and a 'file_name'")
        if not _is_int(image["id"]):
            raise UserError(f"{path}: images[{index}] has id {image['id']!r}; expected an integer")
        if image["id"] in image_ids:
            raise UserError(f"{path}: images[{index}] repeats image id {image['id']} "
                            f"(of images[{image_ids[image['id']]}])")
        image_ids[image["id"]] = index
    annotation_ids: set[int] = set()
    for index, annotation in enumerate(data.setdefault("annotations", [])):
        where = f"{path}: annotations[{index}]"
        if not isinstance(annotation, dict) or not {"id", "image_id", "category_id", "bbox"} <= annotation.keys():
            raise UserError(f"{where} needs 'id', 'image_id', 'category_id' and 'bbox'")
        for key in ("id", "image_id", "category_id"):
            if not _is_int(annotation[key]):
                raise UserError(f"{where} has {key} {annotation[key]!r}; expected an integer")
        if annotation["id"] in annotation_ids:
            raise UserError(f"{where} repeats annotation id {annotation['id']}")
        annotation_ids.add(annotation["id"])
        if annotation["category_id"] not in seen:
            raise UserError(f"{where} has category_id {annotation['category_id']}, which 'categories' does not name")
        bbox = annotation["bbox"]
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
                or bbox[2] < 0 or bbox[3] < 0):
            raise UserError(f"{where} has bbox {bbox!r}; expected [x, y, width, height] with width, height >= 0")
        crowd = annotation.setdefault("iscrowd", 0)
        if not _is_int(crowd) or crowd not in (0, 1):
            raise UserError(f"{where} has iscrowd {crowd!r}; expected 0 or 1")
    return data


def coco_class_names(categories: Sequence[dict[str, Any]]) -> list[str]:
    """Class k = the category with id k, "__background__" at 0, "N/A" at unused ids (torchvision's COCO list)."""
    names = [UNUSED] * (max(category["id"] for category in categories) + 1)
    names[0] = BACKGROUND
    for category in categories:
        names[category["id"]] = category["name"]
    return names


def _coco_index(data: dict[str, Any]):
    """A pycocotools COCO over already-read annotations (its own constructor would read the file again)."""
    require_pycocotools("reading COCO-format annotations")
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        coco.createIndex()
    return coco


class _UnreadableImage(Exception):
    """Raised through the v2 wrapper by `_CocoImages._load_image` for a file that can't be decoded."""


class _CocoImages(CocoDetection):
    """`CocoDetection` over an index built from checked annotations, reading images tolerantly (`read_image`)."""

    def __init__(self, image_dir: Path, coco, *, mode: str, strict: bool) -> None:
        VisionDataset.__init__(self, str(image_dir))
        self.coco = coco
        self.ids = list(sorted(coco.imgs.keys()))
        self.convert, self.strict = ConvertMode(mode), strict
        self.broken_files: set[str] = set()

    def _load_image(self, id: int) -> Image.Image:
        path = os.path.join(self.root, self.coco.loadImgs(id)[0]["file_name"])
        image = read_image(path, self.convert, strict=self.strict, broken_files=self.broken_files)
        if image is None:
            raise _UnreadableImage(path)
        return image


class CocoImages(Dataset):
    """One split of a COCO-format folder: item i is `transform(PIL image, target)` for the i-th image id in
    ascending order, or None when its file can't be decoded (warned about once; a UserError with `strict`).

    The target: {"boxes": tv_tensors.BoundingBoxes XYXY float32 [N, 4], "labels": category ids int64 [N],
    "iscrowd": int64 [N], "image_id"}, every annotation of the image (also crowd ones: the transform decides).
    `classes` the class names, `annotation_file` and `image_dir` where it comes from, `broken_files` the images
    this process failed to read.
    """

    def __init__(self, annotation_file: Path, image_dir: Path, data: dict[str, Any], classes: Sequence[str],
                 transform: Callable | None = None, *, strict: bool = False, mode: str = "RGB") -> None:
        self.annotation_file, self.image_dir = annotation_file, image_dir
        self.classes, self.transform = list(classes), transform
        Image.init()  # register every PIL plugin once, before workers fork
        # only the wrapper is kept: it pickles (spawned DataLoader workers) as a copy of the one dataset it wraps
        self.images = wrap_dataset_for_transforms_v2(_CocoImages(image_dir, _coco_index(data), mode=mode,
                                                                 strict=strict), target_keys=TARGET_KEYS)

    @property
    def broken_files(self) -> set[str]:
        return self.images._dataset.broken_files

    @property
    def ids(self) -> list:
        """The image ids, ascending: item i is image ids[i]."""
        return self.images._dataset.ids

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[Image.Image, dict[str, Any]] | None:
        """(PIL image, target) untransformed, or None for an image that can't be decoded."""
        try:
            image, target = self.images[int(index)]  # CocoDetection takes Python ints only
        except _UnreadableImage:
            return None
        canvas_size = (image.height, image.width)
        if "boxes" not in target:  # the wrapper gives an image without annotations its image_id alone
            empty = torch.zeros(0, dtype=torch.int64)
            return image, {"boxes": _xyxy(torch.zeros(0, 4), canvas_size), "labels": empty, "iscrowd": empty.clone(),
                           "image_id": target["image_id"]}
        return image, {"boxes": _xyxy(target["boxes"].as_subclass(torch.Tensor), canvas_size),
                       "labels": torch.as_tensor(target["labels"], dtype=torch.int64),
                       "iscrowd": torch.as_tensor(target["iscrowd"], dtype=torch.int64),
                       "image_id": target["image_id"]}

    def __getitem__(self, index: int):
        loaded = self.load(index)
        if loaded is None or self.transform is None:
            return loaded
        return self.transform(*loaded)


def coco_datasets(root: Path, *, need_train: bool, transforms: tuple[Callable | None, Callable],
                  strict: bool = False, mode: str = "RGB") -> tuple[CocoImages | None, CocoImages, list[str]]:
    """(train or None, val, class names) of a COCO-format folder; transforms = (train transform, val transform)."""
    wanted = ("train", "val") if need_train else ("val",)
    files = {}
    for split in wanted:
        found = coco_files(root, split)
        if found is None:
            raise UserError(f"{root} has no annotations/instances_{split}.json ({COCO_HINT})")
        if not found[1].is_dir():
            raise UserError(f"{found[0]} has no image folder {found[1]} ({COCO_HINT})")
        files[split] = found
    require_pycocotools("reading COCO-format annotations")  # before reading what may be a large file
    data = {split: read_coco_json(files[split][0]) for split in wanted}
    names = {split: {c["id"]: c["name"] for c in data[split]["categories"]} for split in wanted}
    if need_train and names["train"] != names["val"]:
        differ = sorted(set(names["train"].items()) ^ set(names["val"].items()))[0]
        raise UserError(f"{files['train'][0]} and {files['val'][0]} name different categories (e.g. id {differ[0]}: "
                        f"{names['train'].get(differ[0])!r} against {names['val'].get(differ[0])!r})")
    classes = coco_class_names(data["val"]["categories"])

    def split(name: str, transform: Callable | None) -> CocoImages:
        return CocoImages(*files[name], data[name], classes, transform, strict=strict, mode=mode)

    return (split("train", transforms[0]) if need_train else None), split("val", transforms[1]), classes
