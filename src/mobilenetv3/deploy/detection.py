"""SSDLite detection outside eager PyTorch: the network's raw outputs, its anchors, and the decoding that turns
them into boxes -- the contract of every exported detector, and `predict` for detectors.

An SSDLite model (`mobilenetv3.models.heads.ssdlite.SSDLite`, a `torchvision.models.detection.SSD`) does
three things in eval mode: it resizes each image (pixels in [0, 1], any size) to its fixed input size and
normalises it (`model.transform`), runs the backbone and the head, and post-processes: softmax, box decoding
against the anchors, a score threshold, top-k candidates per class, per-class NMS, a cap on detections, and
the boxes scaled back to each image's own size.  Only the middle part is a network; an export holds that:

    SSDLiteRaw(model, with_anchors=True)     the exported module
      input   "input"            float32 [N, C, H, W]: pixels in [0, 1] already resized to the model's size
                                 (`input_size(model)`; bilinear, align_corners=False, no antialiasing, as
                                 `prepare` and torchvision's transform do), NOT normalised: the artifact
                                 normalises with the model's own image_mean / image_std
      outputs "bbox_regression"  float32 [N, A, 4]: box deltas (dx, dy, dw, dh) against each anchor, for
                                 torchvision's BoxCoder with weights (10, 10, 5, 5)
              "cls_logits"       float32 [N, A, K]: class logits, K = num_classes, index 0 the background
                                 (softmax over K gives the scores)
              "anchors"          float32 [A, 4]: a constant, the default boxes (x0, y0, x1, y1) in pixels of
                                 the H x W input (`anchors(model)`, from the model's own anchor generator)

The spatial size is fixed: the anchors (their count A and positions) depend on it.  The batch axis is dynamic
where the format allows it (ONNX, TorchScript, ExportedProgram; ExecuTorch programs have a fixed batch).

`decode(bbox_regression, cls_logits, anchors, **decode_settings(model or metadata), image_sizes=...)` gives
torchvision's list of `{"boxes", "labels", "scores"}`: it runs `SSD.postprocess_detections` itself (its
BoxCoder, `box_ops.clip_boxes_to_image`, `box_ops.batched_nms`) and the transform's `resize_boxes`, so the
result is the eager model's own -- up to float rounding from normalising after the resize rather than
before it (an affine map per channel commutes with bilinear interpolation).  numpy inputs are accepted (an
ONNX Runtime session's outputs).  An artifact's metadata carries everything `decode` needs (`"detection"`:
input size, thresholds, box-coder weights, output names) and the class names.

Example (ONNX Runtime, no model needed)::

    session = onnxruntime.InferenceSession("ssdlite.onnx")
    metadata = session.get_modelmeta().custom_metadata_map
    batch, sizes = prepare([image], decode_settings(metadata)["input_size"])  # image: [C, h, w] in [0, 1]
    outputs = session.run(None, {"input": batch.numpy()})  # bbox_regression, cls_logits, anchors
    detections = decode(*outputs, **decode_settings(metadata), image_sizes=sizes)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import resize_boxes

from ..errors import UserError
from ..models.heads.ssdlite import SSDLITE_DEFAULTS
from ..preprocessing import ConvertMode, Preprocessing
from .export import model_task
from .predict import Skipped, decoded_groups, output_names, palette
from .runtime import split_threads

logger = logging.getLogger(__name__)

#: The exported artifact's outputs, in order (the anchors are a constant of the artifact).
OUTPUT_NAMES = ("bbox_regression", "cls_logits", "anchors")
#: torchvision's SSD box coding: `det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))`.
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
#: The post-processing settings `decode` takes, with the model class's defaults (torchvision's SSDLite320).
POSTPROCESS_KEYS = ("score_thresh", "nms_thresh", "topk_candidates", "detections_per_img")
#: What `predict` shows by default: the model's own score threshold (0.001) is for mAP, not for looking at.
DISPLAY_SCORE_THRESH = 0.3


def is_detector(model: nn.Module) -> bool:
    """Whether `model` is an SSDLite detector (`export.model_task(model) == "detection"`)."""
    return model_task(model) == "detection"


def input_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) every image is resized to inside `model`, as its transform does it: torchvision's
    `_resize_image_and_masks` resizes to (fixed_size[1], fixed_size[0]), i.e. it reads SSD's `size` as
    (width, height)."""
    fixed = model.transform.fixed_size
    return int(fixed[1]), int(fixed[0])


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


class SSDLiteRaw(nn.Module):
    """An SSDLite model up to its raw head outputs: `forward(images)` with images [B, C, H, W] in [0, 1] at the
    model's input size (`input_size(model)`) returns `(bbox_regression [B, A, 4], cls_logits [B, A, K])`, i.e.
    `model.head(list(model.backbone(normalised).values()))`, normalised with the model's image_mean / image_std.

    `with_anchors=True` (the exported module) returns the anchors [A, 4] as a third, constant output.  The
    modules are the model's own (not copies).
    """

    def __init__(self, model: nn.Module, *, with_anchors: bool = False) -> None:
        super().__init__()
        self.backbone, self.head = model.backbone, model.head
        channels = len(model.transform.image_mean)
        self.register_buffer("mean", torch.tensor(model.transform.image_mean, dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std, dtype=torch.float32).view(1, channels, 1, 1))
        self.with_anchors = with_anchors
        # not named "anchors": the ONNX output is, and an initializer of the same name would clash with it
        self.register_buffer("anchor_boxes", anchors(model).detach().cpu() if with_anchors else torch.empty(0, 4))
        self.input_size = input_size(model)

    def forward(self, images: torch.Tensor):
        outputs = self.head(list(self.backbone((images - self.mean) / self.std).values()))
        if self.with_anchors:
            return outputs["bbox_regression"], outputs["cls_logits"], self.anchor_boxes.clone()
        return outputs["bbox_regression"], outputs["cls_logits"]


def anchors(model: nn.Module) -> torch.Tensor:
    """The default boxes [A, 4] (x0, y0, x1, y1 in pixels of the model's H x W input), from the model's own
    `anchor_generator` on its own feature maps -- what `SSD.forward` decodes against.  Runs the backbone once on
    zeros (in eval mode: BatchNorm statistics are not touched)."""
    height, width = input_size(model)
    parameter = next(model.parameters())
    channels = len(model.transform.image_mean)
    modes = [(module, module.training) for module in model.backbone.modules()]
    model.backbone.eval()
    try:
        with torch.no_grad():
            images = torch.zeros(1, channels, height, width, dtype=parameter.dtype, device=parameter.device)
            features = list(model.backbone(images).values())
            return model.anchor_generator(ImageList(images, [(height, width)]), features)[0]
    finally:
        for module, training in modes:  # each module's own mode back (a frozen BatchNorm stays in eval)
            module.training = training


def decode_settings(source: Any) -> dict[str, Any]:
    """`decode`'s keyword arguments for an SSDLite model, or an exported artifact's metadata (string values, as
    `runtime`'s engines and `export.read_artifact_metadata` give it): input_size (height, width) and the
    post-processing thresholds the model was built with."""
    if isinstance(source, nn.Module):
        return {"input_size": input_size(source), **{key: getattr(source, key) for key in POSTPROCESS_KEYS}}
    if "detection" not in source:
        raise UserError("the metadata has no 'detection' entry: not an exported SSDLite detector")
    stored = json.loads(source["detection"])
    return {"input_size": tuple(stored["input_size"]), **{key: stored[key] for key in POSTPROCESS_KEYS}}


def detection_metadata(model: nn.Module) -> dict[str, str]:
    """The metadata an exported detector carries besides the weights-file vocabulary: "task": "detection" and
    "detection" (JSON: input_size [H, W], the post-processing settings, the box coder's weights, what the input
    is, the output names and the anchor count)."""
    settings = decode_settings(model)
    info = {
        **settings, "input_size": list(settings["input_size"]), "box_coder_weights": list(BOX_CODER_WEIGHTS),
        "input": "pixels in [0, 1] resized to input_size (bilinear, align_corners=False, no antialiasing), "
                 "not normalised",
        "outputs": list(OUTPUT_NAMES), "num_anchors": int(anchors(model).shape[0]),
        "image_mean": list(model.transform.image_mean), "image_std": list(model.transform.image_std),
    }
    return {"task": "detection", "detection": json.dumps(info, sort_keys=True)}


def artifact_preprocessing(model: nn.Module) -> Preprocessing:
    """The artifact input's preprocessing in the weights-file vocabulary: pixels in [0, 1] (mean 0, std 1: the
    artifact normalises itself), resized to the model's size without cropping.  `input_size` is the height
    (`detection_metadata`'s input_size is the full (height, width))."""
    channels = len(model.transform.image_mean)
    return Preprocessing(input_size=input_size(model)[0], crop_pct=1.0, interpolation="bilinear",
                         mean=(0.0,) * channels, std=(1.0,) * channels, in_chans=channels)


def prepare(images: Sequence[torch.Tensor], size: int | Sequence[int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(batch [B, C, H, W], original (height, width) of each image): each image [C, h, w] in [0, 1] resized to
    `size` as the model's transform resizes (`torch.nn.functional.interpolate`, bilinear, align_corners=False)."""
    height, width = _pair(size)
    resized, sizes = [], []
    for image in images:
        image = torch.as_tensor(image)
        sizes.append((int(image.shape[-2]), int(image.shape[-1])))
        resized.append(nn.functional.interpolate(image[None].float(), size=(height, width), mode="bilinear",
                                                 align_corners=False)[0])
    return torch.stack(resized), sizes


def decode(
    bbox_regression: torch.Tensor | np.ndarray,
    cls_logits: torch.Tensor | np.ndarray,
    anchors: torch.Tensor | np.ndarray,
    *,
    input_size: int | Sequence[int],
    image_sizes: Sequence[Sequence[int]] | None = None,
    score_thresh: float = SSDLITE_DEFAULTS["score_thresh"],
    nms_thresh: float = SSDLITE_DEFAULTS["nms_thresh"],
    topk_candidates: int = SSDLITE_DEFAULTS["topk_candidates"],
    detections_per_img: int = SSDLITE_DEFAULTS["detections_per_img"],
) -> list[dict[str, torch.Tensor]]:
    """Raw outputs -> torchvision's detections: one `{"boxes" [n, 4] (x0, y0, x1, y1), "labels" [n] int64,
    "scores" [n]}` per image, by score, as `SSD.forward` returns them in eval mode.

    Args:
        bbox_regression, cls_logits: [B, A, 4] and [B, A, K], an artifact's (or `SSDLiteRaw`'s) outputs.
        anchors: [A, 4], the artifact's third output (or `anchors(model)`).
        input_size: the (height, width) the images were resized to (`decode_settings` gives it); boxes are
            clipped to it.
        image_sizes: each image's original (height, width): boxes are scaled to it (torchvision's
            `transform.postprocess`).  None: boxes stay in pixels of the input_size input.
        score_thresh, nms_thresh, topk_candidates, detections_per_img: as `SSD` (default: the model class's,
            torchvision's SSDLite320 values; `decode_settings(model)` gives a model's own).

    Runs torchvision's `SSD.postprocess_detections` (softmax, `BoxCoder(weights=(10, 10, 5, 5)).decode_single`,
    `box_ops.clip_boxes_to_image`, per-class score threshold and top-k, `box_ops.batched_nms`, the cap) on a
    stand-in holding these settings, then `transform.resize_boxes`: the same code as the eager model.
    """
    bbox_regression = torch.as_tensor(bbox_regression, dtype=torch.float32)
    cls_logits = torch.as_tensor(cls_logits, dtype=torch.float32)
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    if bbox_regression.dim() != 3 or cls_logits.dim() != 3 or anchors.dim() != 2:
        raise ValueError(f"expected bbox_regression [B, A, 4], cls_logits [B, A, K] and anchors [A, 4], got "
                         f"{tuple(bbox_regression.shape)}, {tuple(cls_logits.shape)} and {tuple(anchors.shape)}")
    if not bbox_regression.shape[:2] == cls_logits.shape[:2] or bbox_regression.shape[1] != anchors.shape[0]:
        raise ValueError(f"bbox_regression {tuple(bbox_regression.shape)}, cls_logits {tuple(cls_logits.shape)} "
                         f"and anchors {tuple(anchors.shape)} do not agree on the batch and anchor counts")
    count = bbox_regression.shape[0]
    size = _pair(input_size)
    if image_sizes is not None and len(image_sizes) != count:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {count}")
    # the attributes SSD.postprocess_detections reads from its `self`
    settings = SimpleNamespace(box_coder=det_utils.BoxCoder(weights=BOX_CODER_WEIGHTS),
                               score_thresh=float(score_thresh), nms_thresh=float(nms_thresh),
                               topk_candidates=int(topk_candidates), detections_per_img=int(detections_per_img))
    head_outputs = {"bbox_regression": bbox_regression, "cls_logits": cls_logits}
    detections = SSD.postprocess_detections(settings, head_outputs, [anchors] * count, [size] * count)
    if image_sizes is not None:
        for detection, original in zip(detections, image_sizes):
            detection["boxes"] = resize_boxes(detection["boxes"], list(size), [int(v) for v in original])
    return detections


# --- predict -----------------------------------------------------------------------------------------------

def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (already in the model's mode) as a float [C, h, w] tensor in [0, 1] (uint8 / 255)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # np.array: a writable copy
    pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    return pixels.float() / 255.0


class DetectionImageLoader:
    """path -> (the image resized to the model's input, float32 [C, H, W] in [0, 1]; the decoded image at its
    original size, in the model's mode: "L" for one channel, else "RGB")."""

    def __init__(self, size: int | Sequence[int], in_chans: int) -> None:
        self.size = _pair(size)
        self.convert = ConvertMode("L" if in_chans == 1 else "RGB")

    def __call__(self, path: str | os.PathLike) -> tuple[np.ndarray, Image.Image]:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
        image = self.convert(image)
        batch, _ = prepare([image_tensor(image)], self.size)
        return batch[0].numpy(), image


def load_samples(paths: Sequence[str | os.PathLike], size: int | Sequence[int], in_chans: int,
                 count: int) -> np.ndarray | None:
    """Up to `count` of `paths` prepared as `predict` prepares them for a detector (N x C x H x W in [0, 1]), to
    verify an export on the user's own images; unreadable files are passed over (at most 4 x count tried)."""
    from ..preprocessing import DECODE_ERRORS

    loader, samples = DetectionImageLoader(size, in_chans), []
    for tried, path in enumerate(paths):
        if len(samples) == count or tried == 4 * count:
            break
        try:
            samples.append(loader(path)[0])
        except DECODE_ERRORS:
            continue
    return np.stack(samples) if samples else None


def run_outputs(engine: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bbox_regression, cls_logits, anchors) of `engine.run_all` (an engine of `deploy.engines` / `runtime`) on
    any number of images: a fixed-batch program (`engine.fixed_batch`) is fed chunks of exactly its size, the last
    one padded with zeros whose outputs are dropped."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    fixed = getattr(engine, "fixed_batch", None)
    if not fixed or len(images) == fixed:
        boxes, logits, anchor_boxes = engine.run_all(images)[:3]
        return np.asarray(boxes), np.asarray(logits), np.asarray(anchor_boxes)
    count = len(images)
    padding = (-count) % fixed if count else fixed
    padded = np.concatenate([images, np.zeros((padding, *images.shape[1:]), dtype=np.float32)])
    chunks = [engine.run_all(padded[start:start + fixed])[:3] for start in range(0, len(padded), fixed)]
    boxes = np.concatenate([np.asarray(chunk[0]) for chunk in chunks])[:count]
    logits = np.concatenate([np.asarray(chunk[1]) for chunk in chunks])[:count]
    return boxes, logits, np.asarray(chunks[0][2])


@dataclass(frozen=True)
class Detection:
    label: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the original image's pixels

    def to_dict(self) -> dict:
        return {"label": self.label, "class_name": self.class_name, "score": self.score, "box": list(self.box)}


@dataclass(frozen=True)
class DetectionPrediction:
    path: str
    boxes_png: str  # the image with the detections drawn (NAME_boxes.png)
    width: int
    height: int
    detections: tuple[Detection, ...]

    def to_dict(self) -> dict:
        return {"path": self.path, "boxes_png": self.boxes_png, "width": self.width, "height": self.height,
                "detections": [d.to_dict() for d in self.detections]}

    def to_text(self) -> str:
        found = " | ".join(f"{d.class_name} {d.score:.3f} [{', '.join(f'{v:.1f}' for v in d.box)}]"
                           for d in self.detections)
        return f"{self.path}\t{self.boxes_png}\t{len(self.detections)} detections" + (f": {found}" if found else "")


class BoxesWriter:
    """Detections -> `NAME_boxes.png`: the image (RGB) with each box drawn by `torchvision.utils.draw_bounding_boxes`,
    in its class's palette colour, labelled "class score"."""

    def __init__(self, class_names: Sequence[str], width: int = 2) -> None:
        from torchvision.utils import draw_bounding_boxes

        self.draw = draw_bounding_boxes
        self.class_names = list(class_names)
        # Pascal VOC's colours, with the background's black replaced: a class is never drawn black on a photo
        self.colours = [(255, 255, 0) if c == (0, 0, 0) else c for c in palette(len(self.class_names))]
        self.width = width

    def write(self, stem: Path, image: Image.Image, detections: Sequence[Detection]) -> Path:
        stem.parent.mkdir(parents=True, exist_ok=True)
        path = Path(f"{stem}_boxes.png")
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        if detections:
            boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
            pixels = self.draw(pixels, boxes, labels=[f"{d.class_name} {d.score:.2f}" for d in detections],
                               colors=[self.colours[d.label % len(self.colours)] for d in detections],
                               width=self.width)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path, compress_level=1)  # as segmentation overlays
        return path


def predict_detection_files(
    paths: Sequence[Path],
    engine: Any,
    metadata: Mapping[str, str],
    output_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    score_thresh: float = DISPLAY_SCORE_THRESH,
    batch_size: int = 32,
    workers: int | None = None,
) -> Iterator[DetectionPrediction | Skipped]:
    """Yield a `DetectionPrediction` (its `NAME_boxes.png` written under `output_dir`, mirroring the inputs'
    folders) or a `Skipped` for every path, in input order.

    Each image (any size; converted to the model's mode) is resized to the model's input (`prepare`), `engine`
    (with `run_all`: an engine of `deploy.engines` on weights, an ONNX export or a .pte) gives the raw outputs,
    and `decode` the detections scoring above `score_thresh`, with boxes in the image's own pixels.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if not 0.0 <= score_thresh < 1.0:
        raise UserError(f"--score-thresh is a score in [0, 1), got {score_thresh:g}")
    settings = {**decode_settings(metadata), "score_thresh": score_thresh}
    preprocessing = json.loads(metadata["preprocessing"]) if "preprocessing" in metadata else {}
    num_classes = int(metadata.get("num_classes", 0))
    in_chans = int(preprocessing.get("in_chans", 3))
    loader = DetectionImageLoader(settings["input_size"], in_chans)
    names = output_names(list(paths), Path(output_dir))
    writer: BoxesWriter | None = None
    if workers is None:
        workers = split_threads()[1]

    def run_group(group: list[tuple[Path, Any]]) -> Iterator[DetectionPrediction | Skipped]:
        nonlocal writer
        loaded = [item for _, item in group if not isinstance(item, Skipped)]
        if loaded:
            outputs = run_outputs(engine, np.stack([array for array, _ in loaded]))
            sizes = [(image.height, image.width) for _, image in loaded]
            detections = decode(*outputs, **settings, image_sizes=sizes)
            if writer is None:
                count = num_classes or outputs[1].shape[-1]
                known = class_names is not None and len(class_names) == count
                writer = BoxesWriter(list(class_names) if known else [str(i) for i in range(count)])
        row = 0
        for path, item in group:
            if isinstance(item, Skipped):
                yield item
                continue
            image = item[1]
            found = detections[row]
            row += 1
            listed = tuple(
                Detection(int(label), writer.class_names[int(label)] if int(label) < len(writer.class_names)
                          else str(int(label)), float(score), tuple(float(v) for v in box))
                for box, label, score in zip(found["boxes"].tolist(), found["labels"].tolist(),
                                             found["scores"].tolist()))
            png = writer.write(names[path], image, listed)
            yield DetectionPrediction(str(path), str(png), image.width, image.height, listed)

    for group in decoded_groups(paths, loader, workers=workers, batch_size=batch_size):
        yield from run_group(group)


__all__ = ["OUTPUT_NAMES", "BOX_CODER_WEIGHTS", "SSDLiteRaw", "anchors", "decode", "decode_settings", "input_size",
           "prepare", "is_detector", "detection_metadata", "predict_detection_files"]
