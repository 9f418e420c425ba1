"""Classify image files with the preprocessing stored alongside the weights.

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
    """path -> normalised float32 array (C, H, W), exactly `Preprocessing.eval_transform()` for PIL inputs."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing
        self.convert = ConvertMode(preprocessing.image_mode)
        channels = preprocessing.in_chans
        self.mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(channels, 1, 1)
        self.std = np.asarray(preprocessing.std, dtype=np.float32).reshape(channels, 1, 1)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """torchvision's Resize(int): the short side becomes resize_size, the long side is floored."""
        size = self.preprocessing.resize_size
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
        image = self.convert(image)
        image = image.resize(self.resized_size(*image.size), resample=_PIL_FILTERS[self.preprocessing.interpolation])
        crop = self.preprocessing.input_size
        width, height = image.size
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))  # as torchvision
        image = image.crop((left, top, left + crop, top + crop))
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

    def load(path: Path) -> np.ndarray | Skipped:
        try:
            return loader(path)
        except DECODE_ERRORS as error:
            return Skipped(str(path), describe_decode_error(path, error))

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

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: collections.deque[tuple[Path, Future]] = collections.deque()
        path_iter = iter(paths)

        def refill() -> None:  # keep two batches of decoding in flight ahead of the engine
            while len(pending) < 2 * batch_size:
                path = next(path_iter, None)
                if path is None:
                    return
                pending.append((path, pool.submit(load, path)))

        group: list[tuple[Path, np.ndarray | Skipped]] = []  # one batch of images, plus skips among them
        images_in_group = 0
        refill()
        while pending:
            path, future = pending.popleft()
            refill()
            item = future.result()
            if isinstance(item, Skipped):
                logger.warning("skipping unreadable image %s: %s", item.path, item.reason)
            else:
                images_in_group += 1
            group.append((path, item))
            if images_in_group == batch_size:
                yield from run_group(group)
                group, images_in_group = [], 0
        yield from run_group(group)
