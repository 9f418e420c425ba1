"""Train-time transform presets (torchvision.transforms.v2); the eval transform is `Preprocessing.eval_transform()`,
except for segmentation, whose train and eval transforms (`SegmentationTransform`) take an image and its mask,
and detection, whose transforms (`DetectionTransform`) take an image and its boxes.

Every random choice goes through torch's RNG (v2 transforms use torch.rand/randint only), so a DataLoader
worker whose torch seed is known produces the same samples again: that is what bit-exact resume relies on.
The one exception is `SmallImageTrainTransform.seeded`, which draws each image's crop, flip and erasing from
a NumPy generator seeded with that image's own seed, so that a whole batch is transformed in a few tensor ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from ..errors import UserError
from ..preprocessing import INTERPOLATIONS, Preprocessing
from .config import DataConfig
from .decode import FolderTrainTransform

AUTO_AUGMENT_POLICIES = ("autoaugment", "randaugment", "trivialaugment")


def check_transform_settings(cfg: DataConfig) -> None:
    """One-line UserError for an unknown `data.interpolation` or `data.auto_augment`."""
    if cfg.interpolation not in INTERPOLATIONS:
        raise UserError(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {cfg.interpolation!r}")
    if cfg.auto_augment not in (None, "none", *AUTO_AUGMENT_POLICIES):
        raise UserError(
            f"data.auto_augment must be one of {', '.join(AUTO_AUGMENT_POLICIES)} or none, got {cfg.auto_augment!r}"
        )


def _interpolation(cfg: DataConfig):
    check_transform_settings(cfg)
    return InterpolationMode(cfg.interpolation)


def auto_augment_transform(cfg: DataConfig):
    """The AutoAugment (ImageNet policy) / RandAugment / TrivialAugmentWide op `cfg.auto_augment` names.

    None for `cfg.auto_augment` None or "none".  Works on PIL images and on uint8 tensors (1 or 3 channels), which
    is what both callers give it: their rotations, shears and translations take nearest or bilinear interpolation
    only, so `bicubic` (timm's recipe) runs them bilinear.
    """
    interpolation = _interpolation(cfg)
    if interpolation == InterpolationMode.BICUBIC:
        interpolation = InterpolationMode.BILINEAR
    if cfg.auto_augment in (None, "none"):
        return None
    if cfg.auto_augment == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)
    if cfg.auto_augment == "randaugment":
        return v2.RandAugment(magnitude=cfg.randaugment_magnitude, interpolation=interpolation)
    return v2.TrivialAugmentWide(interpolation=interpolation)


def imagenet_train_transform(cfg: DataConfig, preprocessing: Preprocessing) -> FolderTrainTransform:
    """The standard ImageNet train transform of image folders, file path -> augmented uint8 [C, S, S]
    (data/decode.py; the train loader's `finish_batch` normalises the batch on the device).

    RandomResizedCrop(input_size, scale=(scale_min, 1)), horizontal flip, optional
    AutoAugment/RandAugment/TrivialAugment, optional RandomErasing (filling with the mean pixel).
    `cfg.decode == "gpu"`: JPEGs are handed over undecoded, for the device to decode and augment.
    """
    return FolderTrainTransform(
        preprocessing.input_size, mean=preprocessing.mean, std=preprocessing.std, scale=(cfg.scale_min, 1.0),
        interpolation=_interpolation(cfg).value, hflip=cfg.hflip, augment=auto_augment_transform(cfg),
        erasing=cfg.random_erasing, mode=preprocessing.image_mode, encoded=cfg.decode == "gpu")


class RandomPadCropFlip(torch.nn.Module):
    """`v2.RandomCrop(size, padding)` + `v2.RandomHorizontalFlip(p)` with an offset and a flip drawn per image.

    Takes one image [C, H, W] or a batch [B, C, H, W]: zero padding, a uniform crop offset and a flip with
    probability p for each image (the v2 classes would apply one draw to a whole batch), done as one gather.
    The random draws are the same for one image as for a batch of one, so both give the same crop.
    `seeded` takes the draws as given uniforms instead of from torch's RNG.
    """

    #: uniforms `seeded` takes per image: crop row, crop column, flip
    DRAWS = 3

    def __init__(self, size: int, padding: int, flip_p: float) -> None:
        super().__init__()
        self.size, self.padding, self.flip_p = size, padding, flip_p

    def _pad(self, batch: torch.Tensor) -> torch.Tensor:
        return F.pad(batch, [self.padding])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        count = batch.shape[0]
        padded = self._pad(batch)
        height, width = padded.shape[-2:]
        top = torch.randint(0, height - self.size + 1, (count,))
        left = torch.randint(0, width - self.size + 1, (count,))
        flip = torch.rand(count) < self.flip_p
        if images.dim() == 3:  # one image: plain slicing is several times cheaper than the gather
            y, x = int(top[0]), int(left[0])
            crop = padded[0, :, y:y + self.size, x:x + self.size]
            return crop.flip(-1) if bool(flip[0]) else crop
        return self._gather(padded, top, left, flip)

    def seeded(self, batch: torch.Tensor, uniforms: np.ndarray) -> torch.Tensor:
        """[B, C, H, W] cropped and flipped as `uniforms` [B, DRAWS] (floats in [0, 1)) say, image by image."""
        padded = self._pad(batch)
        height, width = padded.shape[-2:]
        draws = torch.from_numpy(uniforms)
        top = (draws[:, 0] * (height - self.size + 1)).long()  # uniform over the same offsets as randint
        left = (draws[:, 1] * (width - self.size + 1)).long()
        return self._gather(padded, top, left, draws[:, 2] < self.flip_p)

    def _gather(self, padded: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(self.size)
        rows = top[:, None] + steps
        cols = left[:, None] + torch.where(flip[:, None], self.size - 1 - steps, steps)
        # advanced indices around a slice: the result is [count, size, size, C]
        crops = padded[torch.arange(padded.shape[0])[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return crops.permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"size={self.size}, padding={self.padding}, flip_p={self.flip_p}"


#: erasing attempts per image, as in torchvision's RandomErasing
ERASING_ATTEMPTS = 10


def erasing_boxes(erasing, uniforms: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-image boxes (row, column, height, width) of `v2.RandomErasing` drawn from given uniforms.

    `uniforms` is [B, 1 + 4 * ERASING_ATTEMPTS]: the gate (erase when below p), then per attempt the erased
    area's fraction and the log aspect ratio (uniform over `erasing.scale` and log `erasing.ratio`) and the box's
    row and column.  The first attempt whose box fits wins, as in torchvision's `make_params`; an image that is
    not erased, or whose attempts all fail, gets a box of height 0.
    """
    count = uniforms.shape[0]
    attempts = uniforms[:, 1:].reshape(count, ERASING_ATTEMPTS, 4)
    low, high = erasing.scale
    log_low, log_high = np.log(erasing.ratio[0]), np.log(erasing.ratio[1])
    area = height * width * (low + (high - low) * attempts[..., 0])
    aspect = np.exp(log_low + (log_high - log_low) * attempts[..., 1])
    box_h = np.round(np.sqrt(area * aspect)).astype(np.int64)  # round half to even, like Python's round
    box_w = np.round(np.sqrt(area / aspect)).astype(np.int64)
    fits = (box_h < height) & (box_w < width)
    first = fits.argmax(axis=1)
    pick = np.arange(count), first
    box_h, box_w = box_h[pick], box_w[pick]
    row = (attempts[..., 2][pick] * (height - box_h + 1)).astype(np.int64)
    col = (attempts[..., 3][pick] * (width - box_w + 1)).astype(np.int64)
    erased = (uniforms[:, 0] < erasing.p) & fits.any(axis=1)
    return np.stack([row, col, np.where(erased, box_h, 0), box_w], axis=1)


def seeded_uniforms(seeds: Sequence[int], count: int) -> np.ndarray:
    """[len(seeds), count] floats in [0, 1): row k from a generator seeded with seeds[k] alone.

    So an image's draws depend only on its own seed, not on the batch, worker or rank it lands in.
    """
    return np.stack([np.random.default_rng(seed).random(count) for seed in seeds])


class SmallImageTrainTransform(torch.nn.Module):
    """Train transform for small uint8 image tensors, on one image [C, H, W] or a batch [B, C, H, W].

    resize (only when the crop size differs from the stored size) -> per-image pad-crop-flip -> optional
    auto-augment (per image, uint8) -> float in [0, 1] and normalise -> optional random erasing (per image).
    On a batch (`InMemoryImages.__getitems__`) the crop, flip and normalisation are single tensor ops, and
    `seeded` (for the training loader, without auto-augment) does the random erasing as one masked fill too.
    """

    batched = True  # InMemoryImages may call it on a whole batch

    def __init__(self, cfg: DataConfig, preprocessing: Preprocessing, native_size: int) -> None:
        super().__init__()
        size = preprocessing.input_size
        self.resize = None
        if size != native_size:
            self.resize = v2.Resize(size, interpolation=_interpolation(cfg), antialias=True)
        self.crop_flip = RandomPadCropFlip(size, padding=max(1, round(size / 14)), flip_p=cfg.hflip)
        self.augment = auto_augment_transform(cfg)
        self.mean, self.std = list(preprocessing.mean), list(preprocessing.std)
        self.erasing = v2.RandomErasing(p=cfg.random_erasing, value=0) if cfg.random_erasing > 0 else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        if self.resize is not None:
            batch = self.resize(batch)
        batch = self.crop_flip(batch)
        if self.augment is not None:
            batch = torch.stack([self.augment(image) for image in batch])
        batch = self._normalize(batch)
        if self.erasing is not None:
            batch = torch.stack([self.erasing(image) for image in batch])
        return batch[0] if images.dim() == 3 else batch

    @property
    def seedable(self) -> bool:
        """Whether `seeded` can run: auto-augment's ops draw from torch's RNG image by image."""
        return self.augment is None

    def seeded(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """A batch [B, C, H, W] transformed with image k's crop, flip and erasing drawn from seeds[k] alone.

        The same image and seed give the same result in any batch (what bit-exact resume needs), with the
        per-image work done as a few batched tensor ops.  It exists because it is cheaper per batch than seeding
        torch's RNG per image; `benchmarks/loader_speed.py` measures both (docs/results.md).
        """
        if not self.seedable:
            raise ValueError("seeded() draws no auto-augment ops; call the transform per image instead")
        uniforms = seeded_uniforms(seeds, RandomPadCropFlip.DRAWS + 1 + 4 * ERASING_ATTEMPTS)
        batch = images if self.resize is None else self.resize(images)
        batch = self._normalize(self.crop_flip.seeded(batch, uniforms[:, :RandomPadCropFlip.DRAWS]))
        if self.erasing is not None:
            height, width = batch.shape[-2:]
            boxes = torch.from_numpy(erasing_boxes(self.erasing, uniforms[:, RandomPadCropFlip.DRAWS:], height, width))
            row, col, box_h, box_w = (boxes[:, k, None, None] for k in range(4))
            rows, cols = torch.arange(height)[None, :, None], torch.arange(width)[None, None, :]
            inside = (rows >= row) & (rows < row + box_h) & (cols >= col) & (cols < col + box_w)
            batch = batch.masked_fill(inside[:, None], self.erasing.value[0])
        return batch

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.to_dtype(batch, torch.float32, scale=True), self.mean, self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


# --- segmentation: the image and its mask move together ---------------------------------------------------------

#: the mask value of pixels outside every class: not counted by the loss or the metrics, and what padding writes
#: into a mask (the one definition; data.segmentation and train.tasks import it)
IGNORE_INDEX = 255


class SegmentationTransform(torch.nn.Module):
    """(image, mask) -> (image float32 [C, H, W] normalised, mask int64 [H, W]) through one v2 pipeline.

    The image is a uint8 tensor [C, H, W] (or `tv_tensors.Image`), the mask [H, W] of class indices (or
    `tv_tensors.Mask`).  Both are wrapped as tv_tensors, so every geometric step of `steps` applies the same
    draw to both, and masks are always resized with nearest interpolation (torchvision coerces it).  Then the
    image alone is scaled to [0, 1] and normalised.  Randomness comes from torch's global RNG only, which is
    what `SeededSamples` seeds per sample.
    """

    def __init__(self, steps: list, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.steps = v2.Compose(steps) if steps else None
        self.mean, self.std = list(mean), list(std)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.steps is not None:
            image, mask = self.steps(image, mask)
        image = F.normalize(F.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True), self.mean, self.std)
        return image, mask.as_subclass(torch.Tensor).long()

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


def padding_fill(preprocessing: Preprocessing) -> list[int]:
    """The uint8 value per channel that normalises to 0 (the mean): what a crop pads the image with."""
    return [round(255 * mean) for mean in preprocessing.mean]


def segmentation_train_transform(cfg: DataConfig, preprocessing: Preprocessing) -> SegmentationTransform:
    """Random scale, random crop, horizontal flip, as torchvision's segmentation references do.

    The short side is resized to input_size times a factor uniform in [cfg.seg_scale_min, cfg.seg_scale_max]
    (`v2.RandomResize`); then an input_size square is cropped at a random place (`v2.RandomCrop`), padding
    the image with its mean and the mask with 255 (ignored) where the resized image is smaller; then a
    horizontal flip with probability cfg.hflip.
    """
    size = preprocessing.input_size
    low = max(1, int(cfg.seg_scale_min * size))
    high = max(low + 1, int(cfg.seg_scale_max * size) + 1)  # RandomResize draws from [low, high)
    steps = [
        v2.RandomResize(low, high, interpolation=_interpolation(cfg), antialias=True),
        v2.RandomCrop(size, pad_if_needed=True,
                      fill={tv_tensors.Image: padding_fill(preprocessing), tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    return SegmentationTransform(steps, preprocessing.mean, preprocessing.std)


def segmentation_eval_transform(preprocessing: Preprocessing) -> SegmentationTransform:
    """Resize the short side to `preprocessing.resize_size` (image and mask; nothing is cropped, so every
    labelled pixel counts), then normalise: what torchvision's segmentation weights' transforms do.
    Images already at that size are left as they are."""
    interpolation = InterpolationMode(preprocessing.interpolation)
    steps = [v2.Resize(preprocessing.resize_size, interpolation=interpolation, antialias=True)]
    return SegmentationTransform(steps, preprocessing.mean, preprocessing.std)


# --- detection: the image and its boxes move together -----------------------------------------------------------


class DetectionTransform(torch.nn.Module):
    """(image, target) -> (image float32 [C, H, W] in [0, 1], target of plain tensors) through one v2 pipeline.

    The image is a uint8 tensor [C, H, W], a `tv_tensors.Image` or a PIL image; the target a dict with "boxes"
    (`tv_tensors.BoundingBoxes`, XYXY, its canvas the image's), "labels" int64 [N], "iscrowd" int64 [N]
    (optional: none are crowd without it) and "image_id".  The boxes are transformed with the image, and the
    labels (and, for evaluation, "iscrowd") stay aligned with them.  Nothing is normalised: the detector does
    it (`image_mean` / `image_std`), as torchvision's detection models take images in [0, 1].

    Training (`train=True`) drops crowd boxes before anything else, as torchvision's detection reference trains
    without them, and its target has no "iscrowd"; evaluation keeps every box and "iscrowd", for the metric.
    Output target: {"boxes": float32 [N, 4] xyxy in the output image's pixels, "labels": int64 [N],
    "image_id": as given, and for evaluation "iscrowd": int64 [N]}.  Randomness comes from torch's global RNG
    only (the v2 transforms draw from it), which is what `SeededSamples` seeds per sample.
    """

    def __init__(self, steps: list, *, train: bool) -> None:
        super().__init__()
        self.steps = v2.Compose(steps) if steps else None
        self.train = train

    def forward(self, image, target: dict) -> tuple[torch.Tensor, dict]:
        image = image if isinstance(image, tv_tensors.Image) else F.to_image(image)
        boxes, labels = target["boxes"], torch.as_tensor(target["labels"], dtype=torch.int64)
        crowd = target.get("iscrowd")
        crowd = torch.zeros_like(labels) if crowd is None else torch.as_tensor(crowd, dtype=torch.int64)
        if self.train:
            keep = crowd == 0
            sample = {"boxes": tv_tensors.wrap(boxes[keep], like=boxes), "labels": labels[keep]}
        else:
            sample = {"boxes": boxes, "labels": labels, "iscrowd": crowd}
        if self.steps is not None:
            image, sample = self.steps(image, sample)
        out = {"boxes": sample["boxes"].as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4),
               "labels": sample["labels"], "image_id": target["image_id"]}
        if not self.train:
            out["iscrowd"] = sample["iscrowd"]
        return image.as_subclass(torch.Tensor), out

    def extra_repr(self) -> str:
        return f"train={self.train}"


def detection_train_transform(cfg: DataConfig, preprocessing: Preprocessing) -> DetectionTransform:
    """SSD's augmentation, as torchvision's detection reference ("ssd" policy; its "ssdlite" policy is the last
    two steps alone, `det_photometric=0, det_zoom_out=1`):

    1. `v2.RandomPhotometricDistort(p=cfg.det_photometric)`: brightness, contrast, saturation, hue and a channel
       permutation, each with that probability (0: the step is left out).  On 1-channel images saturation, hue
       and the permutation change nothing (torchvision leaves grey images as they are), so brightness and
       contrast are what remains;
    2. `v2.RandomZoomOut(side_range=(1, cfg.det_zoom_out))` with probability 0.5: the image is placed at a random
       place in a canvas up to det_zoom_out times its width and height, filled with the dataset's mean
       (`padding_fill`, what the detector normalises to 0); 1 leaves the step out;
    3. `v2.RandomIoUCrop()`: a crop whose IoU with some box is at least one of 0, 0.1, 0.3, 0.5, 0.7, 0.9 (or
       no crop), keeping the boxes whose centres fall inside it, clipped to it;
    4. `v2.RandomHorizontalFlip(cfg.hflip)`;
    5. to float32 in [0, 1], then `v2.SanitizeBoundingBoxes()` drops boxes under 1 pixel wide or high and their
       labels.

    No resize: the detector resizes every image to its own size.  An image without boxes is never cropped
    (RandomIoUCrop finds no box to overlap until it draws "no crop").
    """
    steps: list = []
    if cfg.det_photometric > 0:
        steps.append(v2.RandomPhotometricDistort(p=cfg.det_photometric))
    if cfg.det_zoom_out > 1:
        fill = {tv_tensors.Image: padding_fill(preprocessing), "others": 0}
        steps.append(v2.RandomZoomOut(fill=fill, side_range=(1.0, cfg.det_zoom_out)))
    steps.append(v2.RandomIoUCrop())
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
    return DetectionTransform(steps, train=True)


def detection_eval_transform() -> DetectionTransform:
    """To float32 in [0, 1], nothing else: the detector resizes and normalises, and every box is kept."""
    return DetectionTransform([v2.ToDtype(torch.float32, scale=True)], train=False)
