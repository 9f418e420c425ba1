"""COCO box mAP of a set of detections against their targets, through `pycocotools` (the reference COCO API,
which torchvision's detection references and `torchmetrics` also use).

`coco_map(images)` takes one `(target, detection)` pair per image, both in the image's own pixels:

- target: `{"boxes": [N, 4] xyxy, "labels": [N] (class ids, 0 = background, never a target), "iscrowd": [N]
  (optional; crowd boxes are neither matched as true positives nor counted as misses, COCO's rule)}`;
- detection: torchvision's `{"boxes": [M, 4] xyxy, "labels": [M], "scores": [M]}`.

It returns mAP@[.5:.95], mAP@.5 and mAP@.75 in percent (COCOeval's stats[0..2]), over the classes 1..K-1
that occur in the targets (COCOeval averages over the categories with ground truth).  The ground-truth areas
are the box areas (a COCO file's segment areas only decide the small / medium / large splits, which are
not reported here), so the three numbers are those of the COCO API on the same boxes.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import torch

from ..data.detection import require_pycocotools


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.detach().double().cpu()
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def coco_map(images: Sequence[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
             num_classes: int) -> dict[str, float]:
    """{"map", "map_50", "map_75"} (percent) of the detections against the targets, image by image.

    With no target box at all the COCO API has nothing to average: all three are 0.0."""
    require_pycocotools("detection mAP")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": c} for c in range(1, num_classes)]}
    results: list[dict[str, Any]] = []
    for image_id, (target, detection) in enumerate(images, start=1):
        gt["images"].append({"id": image_id})
        crowd = target.get("iscrowd")
        crowd = [0] * len(target["labels"]) if crowd is None else [int(c) for c in crowd.tolist()]
        for box, label, is_crowd in zip(_xywh(target["boxes"]), target["labels"].tolist(), crowd):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                      "category_id": int(label), "bbox": box, "area": box[2] * box[3],
                                      "iscrowd": is_crowd})
        for box, label, score in zip(_xywh(detection["boxes"]), detection["labels"].tolist(),
                                     detection["scores"].tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    if not gt["annotations"] or not results:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # the COCO API prints its progress
        ground_truth = COCO()
        ground_truth.dataset = gt
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(value), 0.0) for value in evaluator.stats[:3]]  # -1: no ground truth for the setting
    return {"map": 100.0 * stats[0], "map_50": 100.0 * stats[1], "map_75": 100.0 * stats[2]}
