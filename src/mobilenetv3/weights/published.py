"""The published weights table: one row per weights tag a peer library publishes for one of its MobileNetV3
networks, like torchvision's `Weights` entries.

Each row holds where the file is (`url`), the SHA-256 prefix the publisher gives for it, the preprocessing
it was evaluated with, its class count (and class names where they are not ImageNet's), and the accuracy its
publisher reports (torchvision's `Weights.meta["_metrics"]`; timm's `results/results-imagenet.csv` at the
row's preprocessing).  The first
row of a network is its default tag.  How each network's tensors map onto ours is `weights.convert`'s
business (`PeerVariant` and the key maps); downloading and loading is `weights.pretrained`'s.

Torch-free: this module is plain data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_TORCHVISION = "https://download.pytorch.org/models/"
_TIMM_RELEASES = "https://github.com/rwightman/pytorch-image-models/releases/download/"
_HF = "https://huggingface.co/timm/"


@dataclass(frozen=True)
class PublishedWeights:
    """One published weights tag of a peer network."""

    peer: str  # "torchvision" or "timm"
    name: str  # the peer's network name, e.g. "mobilenet_v3_large", "tf_mobilenetv3_small_100"
    tag: str  # torchvision's Weights name or timm's pretrained tag, e.g. "IMAGENET1K_V2", "ra_in1k"
    #: the file, or None for a tag the peer defines without publishing a file
    url: str | None
    #: the first hex digits of the file's SHA-256 as published (the "-<hex>." of torch.hub's file naming),
    #: checked on every download and cache hit; None where the publisher gives none (downloaded unverified)
    sha256: str | None
    #: the preprocessing the weights were evaluated with
    preprocessing: Preprocessing
    num_classes: int = 1000
    #: ImageNet-1k top-1 / top-5 (%), a segmentation set's mIoU / pixel accuracy, or a detection set's box mAP
    #: (COCO's mAP@[.5:.95], x100), as the publisher reports them, at `preprocessing`; keys name the set and the
    #: measure ("imagenet1k_top1", "coco_val2017_voc_labels_miou", "coco_val2017_box_map")
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: the class names, where the publisher gives them and they are not ImageNet-1k's
    class_names: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return f"{self.peer} {self.name}.{self.tag}"

    @property
    def file_name(self) -> str:
        """Name in the download cache: the published one, or "<name>.<tag>.<ext>" when that is generic."""
        published = os.path.basename(urlparse(self.url or "").path)
        if self.sha256 and f"-{self.sha256}." in published:
            return published
        return f"{self.name}.{self.tag}{Path(published).suffix}"


def _prep(crop_pct: float = 0.875, interpolation: str = "bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
          input_size: int = 224) -> Preprocessing:
    return Preprocessing(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)


def _imagenet(top1: float, top5: float) -> dict[str, float]:
    return {"imagenet1k_top1": top1, "imagenet1k_top5": top5}


def _torchvision(name: str, tag: str, file: str, preprocessing: Preprocessing, metrics,
                 class_names: tuple[str, ...] | None = None) -> PublishedWeights:
    sha256 = file.rsplit("-", 1)[1].split(".")[0]
    return PublishedWeights("torchvision", name, tag, _TORCHVISION + file, sha256, preprocessing,
                            len(class_names) if class_names else 1000, metrics, class_names)


#: Pascal VOC's 20 classes and the background, as torchvision's `_VOC_CATEGORIES`.
VOC_CLASSES = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


#: COCO's detection categories by their ids 1..90 and the background at 0, "N/A" at the 10 ids COCO leaves unused
#: (91 names), as torchvision's `_COCO_CATEGORIES`: the class names of its COCO detection weights.
COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def _timm(name: str, tag: str, path: str | None, preprocessing: Preprocessing, metrics=None, *,
          num_classes: int = 1000) -> PublishedWeights:
    """A timm tag: `path` under its GitHub releases ("v0.1-weights/NAME-HASH.pth"), "hf:" for a file on the
    Hugging Face hub only (no hash published), or None for a tag without a file."""
    if path is None:
        url = sha256 = None
    elif path == "hf:":
        url, sha256 = f"{_HF}{name}.{tag}/resolve/main/model.safetensors", None
    else:
        url, sha256 = _TIMM_RELEASES + path, path.rsplit("-", 1)[1].split(".")[0]
    return PublishedWeights("timm", name, tag, url, sha256, preprocessing, num_classes, metrics or {})


_TIMM_BICUBIC = _prep(interpolation="bicubic")
_TF = _prep(mean=INCEPTION_MEAN, std=INCEPTION_STD)
_MIIL = _prep(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

#: Every published tag, each network's default first.
PUBLISHED_WEIGHTS: tuple[PublishedWeights, ...] = (
    _torchvision("mobilenet_v3_large", "IMAGENET1K_V2", "mobilenet_v3_large-5c1a4163.pth",
                 _prep(crop_pct=224 / 232), _imagenet(75.274, 92.566)),  # torchvision's DEFAULT: resize 232, crop 224
    _torchvision("mobilenet_v3_large", "IMAGENET1K_V1", "mobilenet_v3_large-8738ca79.pth",
                 _prep(), _imagenet(74.042, 91.340)),  # resize 256, crop 224
    _torchvision("mobilenet_v3_small", "IMAGENET1K_V1", "mobilenet_v3_small-047dcff4.pth",
                 _prep(), _imagenet(67.668, 87.402)),
    # COCO val2017 images restricted to VOC's 20 classes; torchvision's SemanticSegmentation(resize_size=520):
    # the short side resized to 520, not cropped (crop_pct 1.0 here), ImageNet mean/std.
    _torchvision("lraspp_mobilenet_v3_large", "COCO_WITH_VOC_LABELS_V1", "lraspp_mobilenet_v3_large-d234d4ea.pth",
                 _prep(crop_pct=1.0, input_size=520), {"coco_val2017_voc_labels_miou": 57.9,
                                                       "coco_val2017_voc_labels_pixel_acc": 91.2}, VOC_CLASSES),
    # COCO 2017 detection (91 category ids); torchvision's ObjectDetection transform only scales to [0, 1]: the
    # model resizes every image to 320x320 and normalises with its own image_mean / image_std of 0.5 (as here).
    _torchvision("ssdlite320_mobilenet_v3_large", "COCO_V1", "ssdlite320_mobilenet_v3_large_coco-a79551df.pth",
                 _prep(crop_pct=1.0, input_size=320, mean=INCEPTION_MEAN, std=INCEPTION_STD),
                 {"coco_val2017_box_map": 21.3}, COCO_CATEGORIES),
    _timm("mobilenetv3_large_075", "untrained", None, _prep()),
    _timm("mobilenetv3_large_100", "ra_in1k", "v0.1-weights/mobilenetv3_large_100_ra-f55367f5.pth",
          _TIMM_BICUBIC, _imagenet(75.784, 92.528)),
    _timm("mobilenetv3_large_100", "ra4_e3600_r224_in1k", "hf:",
          _prep(0.95, "bicubic", INCEPTION_MEAN, INCEPTION_STD), _imagenet(76.310, 92.842)),
    _timm("mobilenetv3_large_100", "miil_in21k_ft_in1k", "v0.1-tresnet/mobilenetv3_large_100_1k_miil_78_0-66471c13.pth",
          _MIIL, _imagenet(77.920, 92.894)),
    _timm("mobilenetv3_large_100", "miil_in21k", "v0.1-tresnet/mobilenetv3_large_100_in21k_miil-d71cc17b.pth",
          _MIIL, num_classes=11221),  # ImageNet-21k (winter 2021) classes: no ImageNet-1k accuracy
    _timm("mobilenetv3_large_150d", "ra4_e3600_r256_in1k", "hf:",
          _prep(0.95, "bilinear", INCEPTION_MEAN, INCEPTION_STD, input_size=256), _imagenet(80.994, 95.474)),
    _timm("mobilenetv3_small_050", "lamb_in1k", "v0.1-weights/mobilenetv3_small_050_lambc-4b7bbe87.pth",
          _TIMM_BICUBIC, _imagenet(57.918, 80.144)),
    _timm("mobilenetv3_small_075", "lamb_in1k", "v0.1-weights/mobilenetv3_small_075_lambc-384766db.pth",
          _TIMM_BICUBIC, _imagenet(65.284, 85.462)),
    _timm("mobilenetv3_small_100", "lamb_in1k", "v0.1-weights/mobilenetv3_small_100_lamb-266a294c.pth",
          _TIMM_BICUBIC, _imagenet(67.636, 87.638)),
    _timm("mobilenetv3_rw", "rmsp_in1k", "v0.1-weights/mobilenetv3_100-35495452.pth",
          _TIMM_BICUBIC, _imagenet(75.616, 92.696)),
    _timm("tf_mobilenetv3_large_075", "in1k", "v0.1-weights/tf_mobilenetv3_large_075-150ee8b0.pth",
          _TF, _imagenet(73.442, 91.332)),
    _timm("tf_mobilenetv3_large_100", "in1k", "v0.1-weights/tf_mobilenetv3_large_100-427764d5.pth",
          _TF, _imagenet(75.510, 92.600)),
    _timm("tf_mobilenetv3_large_minimal_100", "in1k", "v0.1-weights/tf_mobilenetv3_large_minimal_100-8596ae28.pth",
          _TF, _imagenet(72.270, 90.664)),
    _timm("tf_mobilenetv3_small_075", "in1k", "v0.1-weights/tf_mobilenetv3_small_075-da427f52.pth",
          _TF, _imagenet(65.706, 86.130)),
    _timm("tf_mobilenetv3_small_100", "in1k", "v0.1-weights/tf_mobilenetv3_small_100-37f49e2b.pth",
          _TF, _imagenet(67.922, 87.686)),
    _timm("tf_mobilenetv3_small_minimal_100", "in1k", "v0.1-weights/tf_mobilenetv3_small_minimal_100-922a7843.pth",
          _TF, _imagenet(62.892, 84.270)),
)

#: (peer, peer network name, tag) -> its row.  Tests point a row at a local file through this dict.
PUBLISHED: dict[tuple[str, str, str], PublishedWeights] = {(w.peer, w.name, w.tag): w for w in PUBLISHED_WEIGHTS}


def published_tags(peer: str, name: str) -> list[PublishedWeights]:
    """The tags of one peer network (downloadable or not), its default first."""
    return [w for w in PUBLISHED.values() if (w.peer, w.name) == (peer, name)]
