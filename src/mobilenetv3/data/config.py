"""Typed data settings (nested in the training config as `data:`).

CONTRACT between the data package and the training package (keep it stable):

    from mobilenetv3.data import DataConfig, DatasetBundle, build_datasets, collate_skipping

    bundle = build_datasets(cfg: DataConfig, *, need_train: bool = True) -> DatasetBundle
        bundle.train: torch Dataset | None   (None when need_train=False)
        bundle.val:   torch Dataset
            items are (image_tensor CxHxW float32 normalised, int label), or None for a broken file -- except
            an image folder's bundle.train since issue 27 (below: uint8 pixels, finish_train_batch normalises)
            (a warning naming the file has been logged; with cfg.strict_data a UserError is raised instead)
        bundle.num_classes: int
        bundle.class_names: list[str]
        bundle.in_chans: int
        bundle.preprocessing: mobilenetv3.Preprocessing   (the eval transform; stored in checkpoints)
        bundle.model_defaults: dict   model kwargs the data implies, e.g. {"in_chans": 1, "stem_stride": 1}

    collate_skipping(batch) -> (images [B,C,H,W], targets [B] int64, skipped: int)
        drops the None items of a batch and reports how many were dropped.

Additions (backward compatible):
    build_datasets(cfg, *, need_train=True, preprocessing: Preprocessing | None = None)
        `preprocessing` replaces the dataset's default eval preprocessing (e.g. a checkpoint's, for `eval`);
        cfg.input_size / cfg.crop_pct still override it when set; a channel-count mismatch is a UserError.
    collate_skipping: when every item of a batch is None, B == 0 (images and targets are empty): skip the step.
Changed (issue 27; not backward compatible for code that reads an image folder's bundle.train itself):
    Image folders: bundle.train's items are (uint8 [3,S,S] pixels, label), not normalised floats, and
        bundle.finish_train_batch(images, targets, device) -> (float32 [B,3,S,S] normalised on device, targets,
        files dropped) makes a collated batch model input (the training loader applies it: `DeviceBatches`).
        With data.decode == "gpu" some train items are `decode.EncodedImage`s (a JPEG's bytes and its crop plan),
        collated into a list, which finish_train_batch decodes on the device.  bundle.val is unchanged.
        Other datasets: finish_train_batch is None (their items are model input already).
    check_data_config(cfg): the one-line UserErrors of build_datasets' settings checks, callable early.
    A folder whose typical image (median of a few files' headers) has a short side at most half the input size
    gets one logging warning naming --input-size (rank 0 only); nothing else changes.
    All randomness of items comes from torch's RNG (v2 transforms, synthetic generators): seeding a worker's
    torch RNG reproduces its samples; no Python `random` or NumPy RNG is used.  (fashion-mnist-seg's canvases
    are generated once, from data.canvas_seed, before any item is drawn: they are data, not augmentation.)

Segmentation (bundle.task == "segmentation"; data/segmentation.py):
    bundle.task: "classification" or "segmentation";  bundle.ignore_index: 255 for segmentation, else None
    items are (image float32 [C,H,W] normalised, mask int64 [H,W] of class indices, 255 = ignore), or None
    collate_skipping(batch) -> (images [B,C,H,W], masks [B,H,W] int64, skipped); items of different sizes
        (a folder's eval images) are padded at the bottom and right to the largest: images 0, masks 255.

Detection (bundle.task == "detection"; data/detection.py):
    items are (image float32 [C,H,W] in [0, 1], NOT normalised: the detector normalises with
        model_defaults["image_mean"] / ["image_std"] and resizes to model_defaults["size"] itself,
        target {"boxes": float32 [N,4] xyxy in the image's pixels, "labels": int64 [N] (0 = background, never
        used), "image_id": int, and in bundle.val only "iscrowd": int64 [N] (1 = a region to ignore)}), or None
        for an unreadable image.  Train targets hold no crowd boxes.  Images differ in size.
    bundle.class_names[0] is the background; bundle.num_classes counts it.
    collate_skipping(batch) -> (list of B images, list of B targets, skipped): lists even when sizes agree.
    When every item is None, images and targets are empty tensors as for the other tasks: test len(images).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping


@dataclass
class DataConfig:
    #: "fashion-mnist", "synthetic", or a folder in ImageNet layout (train/<class>/*, val/<class>/*); for
    #: segmentation "fashion-mnist-seg", "voc:PATH" (Pascal VOC 2012) or a folder with train/images + train/masks;
    #: for detection "fashion-mnist-det", "coco:PATH" or a folder with annotations/instances_*.json (COCO format).
    dataset: str = "synthetic"
    #: where fashion-mnist is looked for (then $MOBILENETV3_DATA, /usr/share/datasets/fashion-mnist, download).
    data_dir: str | None = None
    #: training/eval crop size; None = the dataset's default (224 for folders and synthetic, 28 for fashion-mnist).
    input_size: int | None = None
    crop_pct: float | None = None  # eval: resize to input_size / crop_pct, then centre-crop; None = dataset default
    interpolation: str = "bilinear"
    #: train augmentation
    hflip: float = 0.5
    scale_min: float = 0.08  # RandomResizedCrop scale lower bound (folders)
    auto_augment: str | None = None  # None | "autoaugment" | "randaugment" | "trivialaugment"
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    #: loading (used by the training package's DataLoader)
    workers: int = 2
    #: where an image folder's training JPEGs are decoded: "cpu" (DataLoader workers, libjpeg-turbo) or "gpu"
    #: (the training device, in batches, with the augmentation applied there; data/decode.py)
    decode: str = "cpu"
    strict_data: bool = False  # a broken image is an error instead of a skipped sample
    #: segmentation: the short side is resized to input_size times a factor in [seg_scale_min, seg_scale_max]
    seg_scale_min: float = 0.5
    seg_scale_max: float = 2.0
    #: detection training (data/transforms.py `detection_train_transform`): the probability of each of
    #: RandomPhotometricDistort's distortions (0 = no photometric distortion), and RandomZoomOut's largest
    #: side ratio (its side_range is (1, det_zoom_out); 1 = no zoom-out).  Both 0 and 1 give torchvision's
    #: "ssdlite" policy (IoU crop and flip only); the defaults its "ssd" policy.
    det_photometric: float = 0.5
    det_zoom_out: float = 4.0
    #: fashion-mnist-seg and fashion-mnist-det: how many canvases, and the seed they are generated from
    #: (independent of the run's seed)
    canvas_train_samples: int = 10000
    canvas_val_samples: int = 1000
    canvas_seed: int = 0
    #: synthetic data
    synthetic_train_samples: int = 256
    synthetic_val_samples: int = 64
    synthetic_classes: int = 10

    @classmethod
    def for_run(cls, run_data: Mapping[str, Any] | None, dataset: str, **replace: Any) -> "DataConfig":
        """A training run's data settings (the `data` section of its config; none for a weights file) on
        `dataset`, with the keyword arguments that are not None replaced: how `eval` and `quantize` rebuild
        the data a checkpoint was validated on.  Keys this version does not know are dropped."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{key: value for key, value in (run_data or {}).items() if key in known})
        cfg.dataset = dataset
        for key, value in replace.items():
            if value is not None:
                setattr(cfg, key, value)
        return cfg
