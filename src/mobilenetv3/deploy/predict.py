"""Classify image files with the preprocessing stored alongside the weights; segment them (class-index mask
and overlay PNGs at each image's own size, per-class pixel fractions: `predict_segmentation_files`).

Decoding runs in a thread pool that stays ahead of the engine (PIL decodes and resizes with the GIL
released, and so does ONNX Runtime), so reading images overlaps with inference.  The image pipeline
is numpy + PIL and reproduces `Preprocessing.eval_transform()` (torchvision transforms.v2 on PIL
images) to float rounding: resize of the short side with PIL's antialiasing filter, centre crop,
scale to [0, 1], normalise.
"""

from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import UserError
from ..preprocessing import DECODE_ERRORS, ConvertMode, Preprocessing, describe_decode_error
from .runtime import split_threads

logger = logging.getLogger(__name__)

#: The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Prediction:
    path: str
    indices: tuple[int, ...]
    labels: tuple[str, ...]
    probs: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "topk": [{"index": i, "label": label, "prob": p} for i, label, p in zip(self.indices, self.labels, self.probs)],
        }

    def to_text(self) -> str:
        return f"{self.path}\t" + " | ".join(f"{label} {p:.3f}" for label, p in zip(self.labels, self.probs))


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files among `inputs`: files as given, folders scanned recursively (sorted, hidden ones skipped)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(
                    Path(root) / name for name in sorted(files)
                    if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
                )
        elif path.exists():
            found.append(path)  # named explicitly: try it whatever its extension
        else:
            raise UserError(f"no such file or folder: {path}")
    return found


_PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


class ImageLoader:
    """path -> normalised float32 array (C, H, W), exactly `Preprocessing.eval_transform()` for PIL inputs.

    `crop=False` (segmentation): `eval_transform(crop=False)`, the short side resized and nothing cropped;
    `square=True` with it: resized to input_size x input_size (for programs of one fixed size).
    """

    def __init__(self, preprocessing: Preprocessing, *, crop: bool = True, square: bool = False) -> None:
        self.preprocessing = preprocessing
        self.crop, self.square = crop, square
        self.convert = ConvertMode(preprocessing.image_mode)
        channels = preprocessing.in_chans
        self.mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(channels, 1, 1)
        self.std = np.asarray(preprocessing.std, dtype=np.float32).reshape(channels, 1, 1)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """torchvision's Resize(int): the short side becomes resize_size, the long side is floored."""
        return self.preprocessing.resized_size(width, height, square=self.square and not self.crop)

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        return self.load(path)[0]

    def load(self, path: str | os.PathLike) -> tuple[np.ndarray, Image.Image]:
        """(the normalised array, the decoded image in the model's mode at its original size)."""
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
        original = image = self.convert(image)
        image = image.resize(self.resized_size(*image.size), resample=_PIL_FILTERS[self.preprocessing.interpolation])
        if not self.crop:
            return self.normalise(image), original
        crop = self.preprocessing.input_size
        width, height = image.size
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))  # as torchvision
        return self.normalise(image.crop((left, top, left + crop, top + crop))), original

    def normalise(self, image: Image.Image) -> np.ndarray:
        array = np.asarray(image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return (array.astype(np.float32) / np.float32(255.0) - self.mean) / self.std


def load_samples(paths: Iterable[str | os.PathLike], preprocessing: Preprocessing, count: int) -> np.ndarray | None:
    """Up to `count` of `paths` prepared as `predict` prepares them (N x C x R x R), for verifying an export
    on the user's own data; unreadable files are passed over (at most 4 x count files are tried)."""
    loader, samples = ImageLoader(preprocessing), []
    for tried, path in enumerate(paths):
        if len(samples) == count or tried == 4 * count:
            break
        try:
            samples.append(loader(path))
        except DECODE_ERRORS:
            continue
    return np.stack(samples) if samples else None


def softmax_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the k most probable classes per row, most probable first."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(probs, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    return top, np.take_along_axis(probs, top, axis=1)


def decoded_groups(paths: Iterable[Path], load: Callable[[Path], object], *, workers: int,
                   batch_size: int) -> Iterator[list[tuple[Path, object]]]:
    """`decoded_ahead`'s (path, item) pairs in groups of `batch_size` decoded images (plus the skips among
    them; the last group may be short), with two batches decoding ahead of the engine."""
    group: list[tuple[Path, object]] = []
    images_in_group = 0
    for path, item in decoded_ahead(paths, load, workers=workers, ahead=2 * batch_size):
        images_in_group += not isinstance(item, Skipped)
        group.append((path, item))
        if images_in_group == batch_size:
            yield group
            group, images_in_group = [], 0
    if group:
        yield group


def decoded_ahead(paths: Iterable[Path], load: Callable[[Path], object], *, workers: int,
                  ahead: int) -> Iterator[tuple[Path, object]]:
    """(path, `load(path)` or a `Skipped`) for every path, in input order, with up to `ahead` images decoding on
    `workers` threads ahead of the consumer; an unreadable image becomes a `Skipped` and one warning."""

    def safe_load(path: Path):
        try:
            return load(path)
        except DECODE_ERRORS as error:
            return Skipped(str(path), describe_decode_error(path, error))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: collections.deque[tuple[Path, Future]] = collections.deque()
        path_iter = iter(paths)

        def refill() -> None:
            while len(pending) < ahead:
                path = next(path_iter, None)
                if path is None:
                    return
                pending.append((path, pool.submit(safe_load, path)))

        refill()
        while pending:
            path, future = pending.popleft()
            refill()
            item = future.result()
            if isinstance(item, Skipped):
                logger.warning("skipping unreadable image %s: %s", item.path, item.reason)
            yield path, item


def predict_files(
    paths: Iterable[Path],
    engine: Callable[[np.ndarray], np.ndarray],
    preprocessing: Preprocessing,
    *,
    class_names: Sequence[str] | None = None,
    topk: int = 5,
    batch_size: int = 32,
    workers: int | None = None,
) -> Iterator[Prediction | Skipped]:
    """Yield a `Prediction` or a `Skipped` for every path, in input order, as batches complete."""
    if topk < 1 or batch_size < 1:
        raise UserError(f"--topk and --batch-size must be positive, got {topk} and {batch_size}")
    loader = ImageLoader(preprocessing)
    if workers is None:
        workers = split_threads()[1]

    def run_group(group: list[tuple[Path, np.ndarray | Skipped]]) -> Iterator[Prediction | Skipped]:
        images = [item for _, item in group if not isinstance(item, Skipped)]
        if images:
            logits = np.asarray(engine(np.stack(images)), dtype=np.float32)
            indices, probs = softmax_topk(logits, topk)
        row = 0
        for path, item in group:
            if isinstance(item, Skipped):
                yield item
                continue
            labels = tuple(class_names[i] if class_names and i < len(class_names) else str(i) for i in indices[row])
            yield Prediction(str(path), tuple(int(i) for i in indices[row]), labels,
                             tuple(float(p) for p in probs[row]))
            row += 1

    for group in decoded_groups(paths, loader, workers=workers, batch_size=batch_size):
        yield from run_group(group)


# --- segmentation: masks and overlays --------------------------------------------------------------------

#: Class names that mean "nothing here": not drawn on the overlay.
BACKGROUND_NAMES = ("background", "__background__", "_background_")


@dataclass(frozen=True)
class SegmentationPrediction:
    path: str
    mask: str  # the class-index PNG (at the image's own size)
    overlay: str  # the image with the classes drawn over it
    fractions: dict[str, float]  # class name -> fraction of the image's pixels, every class, summing to 1

    def to_dict(self) -> dict:
        return {"path": self.path, "mask": self.mask, "overlay": self.overlay, "fractions": self.fractions}

    def to_text(self) -> str:
        present = sorted(((f, name) for name, f in self.fractions.items() if f > 0), reverse=True)
        return f"{self.path}\t{self.mask}\t" + " | ".join(f"{name} {f:.3f}" for f, name in present)


def palette(count: int) -> list[tuple[int, int, int]]:
    """Pascal VOC's colour map (the bits of the class index spread over R, G, B): class i's overlay colour."""
    colours = []
    for index in range(count):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return colours


def output_names(paths: Sequence[Path], output_dir: Path) -> dict[Path, Path]:
    """Each image's output stem under `output_dir`: its path relative to the images' common folder without the
    extension (photos/a/x.jpg and photos/b/x.jpg -> a/x and b/x), or with it where two images differ only in
    their extension (x.jpg and x.png -> x.jpg and x.png), so outputs never collide."""
    if not paths:
        return {}
    resolved = [path.resolve() for path in paths]
    root = Path(os.path.commonpath([path.parent for path in resolved]))
    relative = [full.relative_to(root) for full in resolved]
    stems = collections.Counter(path.with_suffix("") for path in relative)
    return {path: output_dir / (rel.with_suffix("") if stems[rel.with_suffix("")] == 1 else rel)
            for path, rel in zip(paths, relative)}


class SegmentationWriter:
    """Logits at the model's input size -> the mask at the image's own size (bilinear logits, then argmax),
    written as a class-index PNG (`NAME_mask.png`, 8-bit, or 16-bit past 256 classes) and an overlay PNG
    (`NAME_overlay.png`, `torchvision.utils.draw_segmentation_masks`, the background not drawn)."""

    def __init__(self, class_names: Sequence[str], alpha: float = 0.5) -> None:
        # torch and torchvision only for segmentation outputs: classification on a cached ONNX export stays torch-free
        import torch
        from torchvision.utils import draw_segmentation_masks

        self.torch, self.draw = torch, draw_segmentation_masks
        self.class_names = list(class_names)
        self.colours = palette(len(self.class_names))
        self.alpha = alpha
        self.drawn = [i for i, name in enumerate(self.class_names) if name.lower() not in BACKGROUND_NAMES]

    def mask(self, logits: np.ndarray, width: int, height: int) -> np.ndarray:
        """(classes, h, w) logits -> (height, width) int64 class indices."""
        torch = self.torch
        scores = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None]
        if scores.shape[-2:] != (height, width):
            scores = torch.nn.functional.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
        return scores[0].argmax(0).numpy()

    def write(self, path: Path, stem: Path, logits: np.ndarray, image: Image.Image) -> SegmentationPrediction:
        width, height = image.size
        mask = self.mask(logits, width, height)
        stem.parent.mkdir(parents=True, exist_ok=True)
        mask_path, overlay_path = Path(f"{stem}_mask.png"), Path(f"{stem}_overlay.png")
        if len(self.class_names) <= 256:
            Image.fromarray(mask.astype(np.uint8), mode="L").save(mask_path)
        else:
            Image.fromarray(mask.astype(np.uint16)).save(mask_path)
        torch = self.torch
        counts = np.bincount(mask.ravel(), minlength=len(self.class_names)).astype(np.float64)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        indices = torch.from_numpy(mask)
        overlay = pixels
        drawn = [i for i in self.drawn if counts[i] > 0]  # the classes the mask holds: absent ones draw nothing
        if drawn:  # one boolean mask per drawn class, in its palette colour
            masks = torch.stack([indices == i for i in drawn])
            overlay = self.draw(pixels, masks, alpha=self.alpha, colors=[self.colours[i] for i in drawn])
        # zlib level 1, not PIL's default 6: the overlay is a picture to look at, and writing it dominated predict
        # (benchmarks/segmentation.py --latency, per 512x1024 image: 320 ms with level 6, 172 ms with level 1)
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(overlay_path, compress_level=1)
        fractions = {name: float(count) / mask.size for name, count in zip(self.class_names, counts)}
        return SegmentationPrediction(str(path), str(mask_path), str(overlay_path), fractions)


def predict_segmentation_files(
    paths: Sequence[Path],
    engine: Callable[[np.ndarray], np.ndarray],
    preprocessing: Preprocessing,
    output_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    square: bool = False,
    workers: int | None = None,
) -> Iterator[SegmentationPrediction | Skipped]:
    """Yield a `SegmentationPrediction` (mask and overlay PNGs written under `output_dir`) or a `Skipped` for every
    path, in input order.  Each image is resized (short side to `resize_size`, not cropped; `square`: to
    input_size x input_size) and run alone: images of different shapes do not stack into one batch."""
    loader = ImageLoader(preprocessing, crop=False, square=square)
    names = output_names(list(paths), Path(output_dir))
    writer: SegmentationWriter | None = None
    if workers is None:
        workers = split_threads()[1]

    for path, item in decoded_ahead(paths, loader.load, workers=workers, ahead=2 * max(1, workers)):
        if isinstance(item, Skipped):
            yield item
            continue
        array, image = item
        logits = np.asarray(engine(array[None]), dtype=np.float32)[0]
        if writer is None:
            count = logits.shape[0]
            known = class_names and len(class_names) == count
            writer = SegmentationWriter(list(class_names) if known else [str(i) for i in range(count)])
        yield writer.write(path, names[path], logits, image)
