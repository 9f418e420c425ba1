"""`build_datasets(DataConfig) -> DatasetBundle` and `collate_skipping`: the data package's contract (see config.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

from ..errors import UserError
from ..preprocessing import Preprocessing
from . import detection, fashion_mnist, segmentation
from .config import DataConfig
from .decode import EncodedImage
from .folder import TolerantImageFolder, check_same_classes, split_dirs, typical_image_size
from .synthetic import VAL_SPLIT, SyntheticImages
from .transforms import (
    IGNORE_INDEX,
    SmallImageTrainTransform,
    check_transform_settings,
    detection_eval_transform,
    detection_train_transform,
    imagenet_train_transform,
    segmentation_eval_transform,
    segmentation_train_transform,
)

logger = logging.getLogger(__name__)

#: `data.decode`'s values: where an image folder's training JPEGs are decoded
DECODE_DEVICES = ("cpu", "gpu")
BUILTIN_DATASETS = ("fashion-mnist", "fashion-mnist-seg", "fashion-mnist-det", "synthetic")
#: data.det_zoom_out's largest value: a zoomed-out image has up to its square times the pixels
MAX_ZOOM_OUT = 8.0
#: a folder's images count as "much smaller" than the input size when their typical short side is at most this
#: fraction of it (upscaled at least 2x on a side, 4x the pixels): then a one-line warning names --input-size
UPSCALE_WARNING_FRACTION = 0.5


@dataclass
class DatasetBundle:
    """Datasets plus what the model and checkpoints need to know about them."""

    train: Dataset | None
    val: Dataset
    num_classes: int
    class_names: list[str]
    in_chans: int
    preprocessing: Preprocessing
    model_defaults: dict[str, Any] = field(default_factory=dict)
    #: "classification" (items: image, label), "segmentation" (items: image, mask; data/segmentation.py) or
    #: "detection" (items: image, target dict of boxes and labels; data/detection.py)
    task: str = "classification"
    #: the mask value that counts for nothing (segmentation: 255), else None
    ignore_index: int | None = None
    #: validation's batch size when it must not be the run's: 1 where validation images differ in size
    #: (segmentation folders, VOC), since padding them to one batch would change what the network sees (the
    #: gate's global pooling and the border convolutions), as torchvision's reference evaluates one at a time
    val_batch_size: int | None = None
    #: `(images, targets, device) -> (model input on device, targets, files dropped)`, which the training loader
    #: applies to each collated train batch (`DeviceBatches`), or None when train items are model input already.
    #: Image folders: their uint8 pixels normalised on the device (decode=gpu: decoded there first).
    finish_train_batch: Callable | None = None

    def describe(self) -> str:
        train = f"{len(self.train)} train, " if self.train is not None else ""
        task = "" if self.task == "classification" else f" ({self.task})"
        if self.ignore_index is not None:
            task = f" ({self.task}, {self.ignore_index} = ignore)"
        return (
            f"{train}{len(self.val)} val samples, {self.num_classes} classes, {self.in_chans}x"
            f"{self.preprocessing.input_size}x{self.preprocessing.input_size} input{task}"
        )


def same_dataset(a: str, b: str) -> bool:
    """Whether two --data values name the same data: the same built-in name, or the same folder.

    A relative folder is resolved against the current directory, which need not be the training's: the same
    relative spelling counts as the same folder (its sample count still tells a changed val/ apart)."""
    if a == b:
        return True
    if a in BUILTIN_DATASETS or b in BUILTIN_DATASETS:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def check_data_config(cfg: DataConfig) -> None:
    """One-line UserError (naming the `data.` key) for a setting no dataset can use; build_datasets calls it too."""
    if not cfg.dataset:
        raise UserError("data.dataset (--data) is empty: give 'fashion-mnist', 'fashion-mnist-seg', "
                        "'fashion-mnist-det', 'synthetic', 'voc:PATH', 'coco:PATH' or a folder")
    if cfg.input_size is not None and cfg.input_size < 8:
        raise UserError(f"data.input_size must be >= 8, got {cfg.input_size}")
    if cfg.crop_pct is not None and not 0.0 < cfg.crop_pct <= 1.0:
        raise UserError(f"data.crop_pct must be in (0, 1], got {cfg.crop_pct}")
    check_transform_settings(cfg)
    for name in ("hflip", "random_erasing", "det_photometric"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UserError(f"data.{name} is a probability in [0, 1], got {getattr(cfg, name)}")
    if not 1.0 <= cfg.det_zoom_out <= MAX_ZOOM_OUT:
        raise UserError(f"data.det_zoom_out must be in [1, {MAX_ZOOM_OUT:g}] (1 = no zoom-out), got {cfg.det_zoom_out}")
    if not 0.0 < cfg.scale_min <= 1.0:
        raise UserError(f"data.scale_min must be in (0, 1], got {cfg.scale_min}")
    if not 0 <= cfg.randaugment_magnitude <= 30:
        raise UserError(f"data.randaugment_magnitude must be in [0, 30], got {cfg.randaugment_magnitude}")
    if cfg.decode not in DECODE_DEVICES:
        raise UserError(f"data.decode must be one of {', '.join(DECODE_DEVICES)}, got {cfg.decode!r}")
    if cfg.workers < 0:
        raise UserError(f"data.workers must be >= 0, got {cfg.workers}")
    if not 0.0 < cfg.seg_scale_min <= cfg.seg_scale_max:
        raise UserError(f"data.seg_scale_min must be > 0 and <= data.seg_scale_max, got {cfg.seg_scale_min} and "
                        f"{cfg.seg_scale_max}")
    for name in ("synthetic_train_samples", "synthetic_val_samples", "synthetic_classes", "canvas_train_samples",
                 "canvas_val_samples"):
        if getattr(cfg, name) < 1:
            raise UserError(f"data.{name} must be >= 1, got {getattr(cfg, name)}")


def _eval_preprocessing(default: Preprocessing, base: Preprocessing | None, cfg: DataConfig) -> Preprocessing:
    """The dataset's default (or `base`, e.g. a checkpoint's), with the sizes the config sets explicitly."""
    if base is None:
        base = default.replace(interpolation=cfg.interpolation)
    elif base.in_chans != default.in_chans:
        raise UserError(
            f"the weights expect {base.in_chans}-channel input "
            f"but --data {cfg.dataset} has {default.in_chans} channel(s)"
        )
    return base.replace(input_size=cfg.input_size, crop_pct=cfg.crop_pct)


def build_datasets(
    cfg: DataConfig, *, need_train: bool = True, preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
) -> DatasetBundle:
    """Datasets for `cfg.dataset`: "fashion-mnist", "synthetic", or a folder in ImageNet layout; for segmentation
    "fashion-mnist-seg", "voc:PATH", a folder holding VOCdevkit/VOC2012, or a folder with {train,val}/images
    and {train,val}/masks (data/segmentation.py); for detection "fashion-mnist-det", "coco:PATH" or a folder
    with annotations/instances_{train,val}*.json (data/detection.py).

    `preprocessing` (optional) is the eval preprocessing to start from instead of the dataset's default,
    e.g. a checkpoint's; `cfg.input_size` / `cfg.crop_pct` still override it when set.  `class_names` (e.g. a
    checkpoint's): the classes of a segmentation folder without classes.txt, instead of counting them from the
    masks (a validation split may lack the last class that training saw).
    """
    check_data_config(cfg)
    if cfg.dataset == "fashion-mnist":
        return _fashion_mnist(cfg, need_train, preprocessing)
    if cfg.dataset == "synthetic":
        return _synthetic(cfg, need_train, preprocessing)
    if cfg.dataset == "fashion-mnist-seg":
        return _fashion_mnist_seg(cfg, need_train, preprocessing)
    if cfg.dataset == "fashion-mnist-det":
        return _fashion_mnist_det(cfg, need_train, preprocessing)
    voc = segmentation.voc_root(cfg.dataset)
    if voc is not None:
        return _voc(voc, cfg, need_train, preprocessing)
    coco = detection.coco_root(cfg.dataset)
    if coco is not None:
        return _coco(coco, cfg, need_train, preprocessing)
    if segmentation.is_segmentation_folder(cfg.dataset):
        return _segmentation_folder(cfg, need_train, preprocessing, class_names)
    return _image_folder(cfg, need_train, preprocessing)


def _image_folder(cfg: DataConfig, need_train: bool, base: Preprocessing | None) -> DatasetBundle:
    train_dir, val_dir = split_dirs(cfg.dataset, need_train=need_train)
    prep = _eval_preprocessing(Preprocessing(), base, cfg)
    val = TolerantImageFolder(val_dir, prep.eval_transform(), strict=cfg.strict_data)
    train = None
    if train_dir is not None:
        train = TolerantImageFolder(train_dir, imagenet_train_transform(cfg, prep), strict=cfg.strict_data)
        check_same_classes(train, val)
    _warn_if_upscaled(train if train is not None else val, prep, cfg, base)
    return DatasetBundle(train, val, len(val.classes), list(val.classes), 3, prep, {},
                         finish_train_batch=None if train is None else train.finish_batch)


def _warn_if_upscaled(
    folder: TolerantImageFolder, prep: Preprocessing, cfg: DataConfig, base: Preprocessing | None
) -> None:
    """One warning, naming --input-size, when the folder's images are much smaller than the input size they are
    resized to (e.g. 32x32 images at the folders' default 224 px cost ~49x the compute, for no new detail).

    Training (`base` None) is told to pass --input-size; evaluating weights at their own input size is told that
    another size changes the results, since such weights were trained on images resized as these are."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # one warning per job, not one per rank
    size = typical_image_size(folder)
    if size is None:
        return
    width, height = size
    short, wanted = min(width, height), prep.input_size
    if short > UPSCALE_WARNING_FRACTION * wanted:
        return
    suggested = max(short, 8)  # data.input_size must be >= 8
    cheaper = f"about {(wanted / suggested) ** 2:.0f}x less compute per image"
    seen = f"images in {folder.root} are about {width}x{height} px but are resized to {wanted} px"
    if base is None:
        source = "data.input_size" + ("" if cfg.input_size is not None else
                                      f", {Preprocessing().input_size} by default for folders")
        logger.warning("%s (%s); pass --input-size %d to train at their own size, %s",
                       seen, source, suggested, cheaper)
    elif wanted == base.input_size:
        logger.warning("%s, the weights' input size (another --input-size changes the results; a model trained "
                       "with --input-size %d would need %s)", seen, suggested, cheaper)
    else:
        logger.warning("%s (--input-size %d; the weights' own input size is %d px)", seen, wanted, base.input_size)


def _fashion_mnist(cfg: DataConfig, need_train: bool, base: Preprocessing | None) -> DatasetBundle:
    default = Preprocessing(
        input_size=fashion_mnist.IMAGE_SIZE, crop_pct=1.0, mean=fashion_mnist.MEAN, std=fashion_mnist.STD, in_chans=1
    )
    prep = _eval_preprocessing(default, base, cfg)
    files = fashion_mnist.locate(cfg.data_dir)
    classes = fashion_mnist.CLASS_NAMES
    # Eval goes through Preprocessing.eval_transform, which accepts uint8 tensors as well as PIL images.
    val = fashion_mnist.InMemoryImages(*fashion_mnist.load_split(files, "test"), classes, prep.eval_transform())
    train = None
    if need_train:
        images, labels = fashion_mnist.load_split(files, "train")
        transform = SmallImageTrainTransform(cfg, prep, native_size=fashion_mnist.IMAGE_SIZE)
        train = fashion_mnist.InMemoryImages(images, labels, classes, transform)
    return DatasetBundle(train, val, len(classes), list(classes), 1, prep, {"in_chans": 1, "stem_stride": 1})


def _synthetic(cfg: DataConfig, need_train: bool, base: Preprocessing | None) -> DatasetBundle:
    # Random tensors fit any weights: follow a given preprocessing's channel count instead of checking it.
    prep = _eval_preprocessing(base or Preprocessing(), base, cfg)
    shape = dict(num_classes=cfg.synthetic_classes, input_size=prep.input_size, in_chans=prep.in_chans)
    val = SyntheticImages(cfg.synthetic_val_samples, split=VAL_SPLIT, **shape)
    train = SyntheticImages(cfg.synthetic_train_samples, **shape) if need_train else None
    defaults = {} if prep.in_chans == 3 else {"in_chans": prep.in_chans}
    return DatasetBundle(train, val, cfg.synthetic_classes, list(val.classes), prep.in_chans, prep, defaults)


#: the eval preprocessing of segmentation folders and VOC: the short side resized to 512, nothing cropped
SEGMENTATION_PREPROCESSING = Preprocessing(input_size=512, crop_pct=1.0)


def _segmentation_bundle(train, val, prep: Preprocessing, defaults: dict[str, Any], *,
                         one_size: bool = False) -> DatasetBundle:
    return DatasetBundle(train, val, len(val.classes), list(val.classes), prep.in_chans, prep, defaults,
                         task="segmentation", ignore_index=IGNORE_INDEX, val_batch_size=None if one_size else 1)


def _segmentation_transforms(cfg: DataConfig, prep: Preprocessing, need_train: bool):
    return (segmentation_train_transform(cfg, prep) if need_train else None), segmentation_eval_transform(prep)


def _segmentation_folder(cfg: DataConfig, need_train: bool, base: Preprocessing | None,
                         class_names: Sequence[str] | None = None) -> DatasetBundle:
    # Any image mode is converted when read: follow the weights' channel count (grey canvases written by
    # segmentation.write_folder train 1-channel models), else RGB.
    default = SEGMENTATION_PREPROCESSING.for_channels(base.in_chans if base is not None else 3)
    prep = _eval_preprocessing(default, base, cfg)
    train, val = segmentation.segmentation_folders(
        cfg.dataset, need_train=need_train, transforms=_segmentation_transforms(cfg, prep, need_train),
        strict=cfg.strict_data, mode=prep.image_mode, class_names=class_names)
    return _segmentation_bundle(train, val, prep, {} if prep.in_chans == 3 else {"in_chans": prep.in_chans})


def _voc(root: Path, cfg: DataConfig, need_train: bool, base: Preprocessing | None) -> DatasetBundle:
    prep = _eval_preprocessing(SEGMENTATION_PREPROCESSING, base, cfg)
    train, val = segmentation.voc_datasets(root, need_train=need_train,
                                           transforms=_segmentation_transforms(cfg, prep, need_train),
                                           strict=cfg.strict_data)
    return _segmentation_bundle(train, val, prep, {})


def _fashion_mnist_seg(cfg: DataConfig, need_train: bool, base: Preprocessing | None) -> DatasetBundle:
    default = Preprocessing(input_size=segmentation.CANVAS_SIZE, crop_pct=1.0, mean=segmentation.CANVAS_MEAN,
                            std=segmentation.CANVAS_STD, in_chans=1)
    prep = _eval_preprocessing(default, base, cfg)
    train_transform, val_transform = _segmentation_transforms(cfg, prep, need_train)
    val = segmentation.fashion_mnist_canvases("val", cfg.canvas_val_samples, cfg.canvas_seed, cfg.data_dir,
                                              val_transform)
    train = None
    if need_train:
        train = segmentation.fashion_mnist_canvases("train", cfg.canvas_train_samples, cfg.canvas_seed, cfg.data_dir,
                                                    train_transform)
    return _segmentation_bundle(train, val, prep, {"in_chans": 1}, one_size=True)


#: the eval preprocessing of COCO-format folders: torchvision's SSDLite320 (320x320, mean and std 0.5); the
#: detector itself resizes and normalises, so it only records what the model is built with (model_defaults)
COCO_PREPROCESSING = Preprocessing(input_size=320, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)


def _detection_bundle(train, val, prep: Preprocessing, class_names: Sequence[str],
                      defaults: dict[str, Any]) -> DatasetBundle:
    """A detection bundle: the model resizes to `size` and normalises itself, both from the preprocessing."""
    defaults = {**defaults, "size": prep.input_size, "image_mean": list(prep.mean), "image_std": list(prep.std)}
    return DatasetBundle(train, val, len(class_names), list(class_names), prep.in_chans, prep, defaults,
                         task="detection")


def _detection_transforms(cfg: DataConfig, prep: Preprocessing, need_train: bool):
    return (detection_train_transform(cfg, prep) if need_train else None), detection_eval_transform()


def _fashion_mnist_det(cfg: DataConfig, need_train: bool, base: Preprocessing | None) -> DatasetBundle:
    default = Preprocessing(input_size=segmentation.CANVAS_SIZE, crop_pct=1.0, mean=segmentation.CANVAS_MEAN,
                            std=segmentation.CANVAS_STD, in_chans=1)
    prep = _eval_preprocessing(default, base, cfg)
    train_transform, val_transform = _detection_transforms(cfg, prep, need_train)
    val = detection.fashion_mnist_boxes("val", cfg.canvas_val_samples, cfg.canvas_seed, cfg.data_dir, val_transform)
    train = None
    if need_train:
        train = detection.fashion_mnist_boxes("train", cfg.canvas_train_samples, cfg.canvas_seed, cfg.data_dir,
                                              train_transform)
    return _detection_bundle(train, val, prep, val.classes, {"in_chans": 1})


def _coco(root: Path, cfg: DataConfig, need_train: bool, base: Preprocessing | None) -> DatasetBundle:
    prep = _eval_preprocessing(COCO_PREPROCESSING, base, cfg)
    train, val, classes = detection.coco_datasets(root, need_train=need_train,
                                                  transforms=_detection_transforms(cfg, prep, need_train),
                                                  strict=cfg.strict_data, mode=prep.image_mode)
    return _detection_bundle(train, val, prep, classes, {})


def collate_skipping(batch: list) -> tuple[torch.Tensor | list, torch.Tensor | list, int]:
    """default_collate of the items that are not None -> (images [B, C, H, W], targets [B] int64, skipped).

    Segmentation items give targets [B, H, W] (masks); items of different sizes (a folder's eval images) are
    padded at the bottom and right to the largest: images with 0 (the mean, once normalised), masks with 255.
    Detection items (a target dict) give (list of B images, list of B target dicts, skipped), lists even when
    the sizes agree: the detector takes them so.  `data.decode: gpu` items (some `EncodedImage`s) give a list of
    B images and targets [B], for `DatasetBundle.finish_train_batch` to decode on the device.  uint8 images
    (an image folder's training pixels) give a uint8 batch in channels-last memory.
    When every item of the batch is None, images and targets are empty (B = 0, len 0): skip the step.
    """
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    if isinstance(kept[0][1], dict):
        return [image for image, _ in kept], [target for _, target in kept], skipped
    if any(isinstance(image, EncodedImage) for image, _ in kept):  # data.decode=gpu: finish_train_batch decodes
        return [image for image, _ in kept], torch.as_tensor([target for _, target in kept], dtype=torch.long), skipped
    if isinstance(kept[0][1], torch.Tensor) and kept[0][1].dim() == 2:
        kept = _padded_to_largest(kept)
    if kept[0][0].dtype == torch.uint8 and kept[0][0].dim() == 3:
        # pixels (an image folder's training items): stacked as [B, H, W, C] memory, the layout they are decoded
        # and resized in, so the stack copies plainly, and given back as an [B, C, H, W] view (channels-last)
        pixels = default_collate([image.permute(1, 2, 0) for image, _ in kept]).permute(0, 3, 1, 2)
        return pixels, torch.as_tensor([target for _, target in kept], dtype=torch.long), skipped
    images, targets = default_collate(kept)
    return images, torch.as_tensor(targets, dtype=torch.long), skipped


def _padded_to_largest(items: list) -> list:
    """(image [C, H, W], mask [H, W]) pairs padded at the bottom and right to the largest H and W of the batch."""
    height = max(mask.shape[0] for _, mask in items)
    width = max(mask.shape[1] for _, mask in items)
    padded = []
    for image, mask in items:
        extra = [0, width - mask.shape[1], 0, height - mask.shape[0]]
        if any(extra):
            image = torch.nn.functional.pad(image, extra, value=0.0)
            mask = torch.nn.functional.pad(mask, extra, value=IGNORE_INDEX)
        padded.append((image, mask))
    return padded
