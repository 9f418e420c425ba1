"""What a task contributes to the one trainer: how to read the network's output, its loss, its training
accuracy, its validation metric (reduced across ranks so every sample counts once) and its metrics columns.

The loop (`loop.py`) and the trainer (`run.py`) call these and do not branch on the task otherwise.

- classification: cross-entropy on the logits; top-1 / top-5 (percent).
- segmentation (LR-ASPP, `{"out": logits}`): cross-entropy over the pixels with `ignore_index` (255) left
  out; a confusion matrix (rows: target class, columns: predicted class; int64, `torch.bincount`) summed over
  the validation set and all-reduced once, from which come the pixel accuracy, the per-class IoU and mIoU.
  mIoU is the mean IoU over the classes present in the target or the prediction (union > 0), torchvision's
  reference-script and mmsegmentation's convention (a class absent from both has no IoU: None in the rows).
- detection (SSDLite, a torchvision `SSD`): images and targets are lists (images of any size, the model resizes
  them); the loss is torchvision's (`bbox_regression + classification`, from the model in train mode); the
  validation metric is COCO's box mAP@[.5:.95], mAP@.5 and mAP@.75 (`coco.py`, pycocotools) over every
  image's detections gathered from all ranks, so each image counts once, and the same loss in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data.transforms import IGNORE_INDEX
from ..errors import UserError
from .distributed import all_gather_objects, all_reduce_sum_, unwrap

TASKS = ("classification", "segmentation", "detection")


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """On the device: the number of samples whose target is in the top-k logits, for each k (capped at the
    class count)."""
    maxk = min(max(ks), logits.shape[1])
    predicted = logits.topk(maxk, dim=1).indices
    hits = predicted.eq(targets[:, None])
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts on the tensors' device: entry (t, p) = pixels of target class t
    predicted as p; pixels whose target is `ignore_index` are not counted."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + predicted[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """Pixel accuracy, per-class IoU and mIoU (percent) from a confusion matrix (see the module docstring for
    the mIoU convention); `iou[c]` is None for a class in neither the target nor the prediction."""
    confusion = confusion.double().cpu()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    iou = torch.where(present, hits / union.clamp(min=1), torch.zeros_like(hits))
    total = confusion.sum()
    return {
        "miou": 100.0 * float(iou[present].mean()) if present.any() else 0.0,
        "pixel_acc": 100.0 * float(hits.sum() / total) if total > 0 else 0.0,
        "iou": [100.0 * float(value) if ok else None for value, ok in zip(iou.tolist(), present.tolist())],
        "pixels": int(total),
    }


class ClassificationMetric:
    """Loss, top-1 and top-5 sums of a validation pass (on the device until `compute`)."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        self.sums += torch.stack([loss.double(), *(hits.double() for hits in topk_hits(logits, targets, (1, 5)))])

    def compute(self, samples: int) -> dict[str, Any]:
        """The rank-summed results (a collective call under DDP)."""
        loss_sum, correct1, correct5 = all_reduce_sum_(self.sums).tolist()
        return {"loss": loss_sum / samples, "top1": 100.0 * correct1 / samples, "top5": 100.0 * correct5 / samples}


class SegmentationMetric:
    """The confusion matrix (int64) and the pixel loss sum of a validation pass, on the device until `compute`."""

    def __init__(self, num_classes: int, device: torch.device, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        self.loss_sum += F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum").double()
        self.confusion += confusion_matrix(logits.argmax(dim=1), targets, self.num_classes, self.ignore_index)

    def compute(self, samples: int) -> dict[str, Any]:
        """The rank-summed results (collective calls under DDP): every pixel of every sample counts once."""
        confusion = all_reduce_sum_(self.confusion)
        loss_sum = float(all_reduce_sum_(self.loss_sum))
        scores = segmentation_scores(confusion)
        return {"loss": loss_sum / max(scores["pixels"], 1), **scores}


class ClassificationTask:
    name = "classification"
    #: `checkpoint.best_metric: auto` follows this column (larger is better)
    best_metric = "val_top1"
    #: result keys that become `{prefix}_val_{key}` columns
    columns = ("loss", "top1", "top5")
    #: whether `train_correct` measures something (the `train_top1` column)
    train_accuracy = True

    def logits(self, output: Any) -> torch.Tensor:
        return output

    def to_device(self, images: torch.Tensor, targets: torch.Tensor, device: torch.device,
                  channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch on the device (non-blocking from pinned memory on CUDA)."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        non_blocking = device.type == "cuda"
        images = images.to(device, non_blocking=non_blocking, memory_format=memory_format)
        return images, targets.to(device, non_blocking=non_blocking)

    def forward_loss(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                     label_smoothing: float) -> tuple[torch.Tensor, Any]:
        """The micro-batch's mean loss and the task's output (what `train_correct` reads)."""
        logits = self.logits(model(images))
        return self.loss(logits, targets, label_smoothing), logits

    def evaluate_batch(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Any:
        """What the validation metric's `update` takes for a batch (the eval-mode network's logits)."""
        return self.logits(model(images))

    def zero_loss(self, output: Any) -> torch.Tensor:
        """0 * the output, a loss that reaches every parameter (DDP's stand-in step, `loop.py`)."""
        return self.logits(output).float().sum() * 0.0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """The mean loss of a micro-batch (targets: class indices, or mixup / cutmix's soft targets)."""
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)

    def train_correct(self, logits: torch.Tensor, hard_targets: torch.Tensor) -> torch.Tensor:
        """The batch's summed training accuracy (a count of samples; `train_top1` is it over the samples)."""
        return topk_hits(logits, hard_targets, (1,))[0]

    def metric(self, num_classes: int, device: torch.device) -> ClassificationMetric:
        return ClassificationMetric(num_classes, device)

    def summary(self, result: dict[str, Any], prefix: str = "") -> str:
        """One log fragment, e.g. "top1 91.20 top5 99.80"."""
        return f"top1 {result[prefix + 'top1']:.2f} top5 {result[prefix + 'top5']:.2f}"

    def check_config(self, config) -> None:
        pass


def refuse_classification_only(config, model: str, augments: str) -> None:
    """One line for what only a classifier's run can use: QAT, and the classification augmentations (auto-augment,
    random erasing, RandomResizedCrop's scale_min); `model` and `augments` say what the dense task has instead."""
    if config.qat.enabled:
        raise UserError(f"quantization-aware training is for classification models; train the {model} in float "
                        "(--no-qat)")
    data = config.data
    ignored = [f"data.{key}={value}" for key, value, default in (
        ("auto_augment", data.auto_augment, None), ("random_erasing", data.random_erasing, 0.0),
        ("scale_min", data.scale_min, type(data)().scale_min)) if value != default]
    if ignored:
        raise UserError(f"{', '.join(ignored)} is for classification ({augments}): drop it")


class SegmentationTask(ClassificationTask):
    name = "segmentation"
    best_metric = "val_miou"
    columns = ("loss", "miou", "pixel_acc", "iou")

    def logits(self, output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output["out"]  # a program's output, or the model's

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """The mean over the pixels that are not ignored; 0 (not NaN) for a batch whose pixels all are."""
        total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                                reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def train_correct(self, logits: torch.Tensor, hard_targets: torch.Tensor) -> torch.Tensor:
        """The sum over the batch of each image's pixel accuracy (ignored pixels left out): `train_top1` is the
        mean per-image pixel accuracy."""
        valid = hard_targets != IGNORE_INDEX
        correct = (logits.argmax(dim=1) == hard_targets) & valid
        return (correct.sum(dim=(1, 2)).double() / valid.sum(dim=(1, 2)).clamp(min=1)).sum()

    def metric(self, num_classes: int, device: torch.device) -> SegmentationMetric:
        return SegmentationMetric(num_classes, device)

    def summary(self, result: dict[str, Any], prefix: str = "") -> str:
        return f"mIoU {result[prefix + 'miou']:.2f} pixel acc {result[prefix + 'pixel_acc']:.2f}"

    def check_config(self, config) -> None:
        regularization = config.regularization
        if regularization.mixup_alpha > 0 or regularization.cutmix_alpha > 0:
            raise UserError("mixup and cutmix blend image labels, not masks: set regularization.mixup_alpha=0 and "
                            "regularization.cutmix_alpha=0 for segmentation")
        refuse_classification_only(config, "segmentation model", "segmentation augments with random scale "
                                   "data.seg_scale_min / data.seg_scale_max, crop and flip")


class DetectionMetric:
    """Each image's target and detections (on the host), and the loss sum of a validation pass."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.pairs: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, output: Any, targets: list[dict[str, torch.Tensor]]) -> None:
        """`output`: (the losses, the detections) of `DetectionTask.evaluate_batch`."""
        losses, detections = output
        self.loss_sum += sum(losses.values()).detach().double() * len(targets)
        keep = ("boxes", "labels", "iscrowd", "scores")
        for target, detection in zip(targets, detections):
            self.pairs.append(({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in target.items()
                                if k in (*keep, "image_id")},
                               {k: v.detach().float().cpu() if k != "labels" else v.cpu()
                                for k, v in detection.items() if k in keep}))

    def compute(self, samples: int) -> dict[str, Any]:
        """COCO mAP over every rank's images (gathered: a collective call under DDP; each rank scores the same
        list, so all return the same numbers)."""
        from .coco import coco_map

        pairs = [pair for rank_pairs in all_gather_objects(self.pairs) for pair in rank_pairs]
        # in the dataset's order, whatever the ranks: COCOeval breaks equal scores by image order
        pairs.sort(key=lambda pair: pair[0].get("image_id", 0))
        loss_sum = float(all_reduce_sum_(self.loss_sum))
        return {"loss": loss_sum / max(samples, 1), **coco_map(pairs, self.num_classes)}


class DetectionTask(ClassificationTask):
    name = "detection"
    best_metric = "val_map"
    columns = ("loss", "map", "map_50", "map_75")
    train_accuracy = False

    def to_device(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], device: torch.device,
                  channels_last: bool = False) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Lists of images (each its own size; the model batches them) and of target dicts on the device."""
        non_blocking = device.type == "cuda"
        images = [image.to(device, non_blocking=non_blocking) for image in images]
        targets = [{k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                    for k, v in target.items()} for target in targets]
        return images, targets

    def forward_loss(self, model: torch.nn.Module, images: list[torch.Tensor],
                     targets: list[dict[str, torch.Tensor]], label_smoothing: float) -> tuple[torch.Tensor, Any]:
        """torchvision's SSD loss (train mode returns {"bbox_regression", "classification"}); the training data
        already leaves crowd boxes out (`data.detection`), as torchvision's reference trains."""
        losses = model(images, targets)
        return losses["bbox_regression"] + losses["classification"], None

    def train_correct(self, output: Any, hard_targets: Any) -> torch.Tensor:
        """Detection has no training accuracy (`train_accuracy` False: no `train_top1` column)."""
        return torch.zeros((), dtype=torch.float64)

    def zero_loss(self, output: Any) -> torch.Tensor:
        return sum(d["scores"].sum() + d["boxes"].sum() for d in output) * 0.0

    def evaluate_batch(self, model: torch.nn.Module, images: list[torch.Tensor],
                       targets: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """(The losses of `forward_loss`, the detections of eval mode) in one pass of the eval-mode network
        (`SSDLite.forward_with_loss`)."""
        return unwrap(model).forward_with_loss(images, [_without_crowd(target) for target in targets])

    def metric(self, num_classes: int, device: torch.device) -> DetectionMetric:
        return DetectionMetric(num_classes, device)

    def summary(self, result: dict[str, Any], prefix: str = "") -> str:
        return (f"mAP {result[prefix + 'map']:.2f} mAP@.5 {result[prefix + 'map_50']:.2f} "
                f"mAP@.75 {result[prefix + 'map_75']:.2f}")

    def check_config(self, config) -> None:
        """One line for what detection cannot use.  The default label smoothing (0.1) is not refused, only not
        applied (torchvision's SSD loss has none); another value is refused, being a request."""
        from ..data.detection import require_pycocotools

        regularization = config.regularization
        default_smoothing = type(regularization)().label_smoothing
        refused = [f"regularization.{key}={value}" for key, value in (
            ("mixup_alpha", regularization.mixup_alpha), ("cutmix_alpha", regularization.cutmix_alpha),
            ("dropblock_prob", regularization.dropblock_prob)) if value > 0]
        if regularization.label_smoothing not in (0.0, default_smoothing):
            refused.append(f"regularization.label_smoothing={regularization.label_smoothing}")
        if refused:
            raise UserError(f"{', '.join(refused)} is for classification (detection trains with torchvision's "
                            "SSD loss on boxes): set it to 0")
        if config.swa.enabled:
            raise UserError("swa.enabled: SWA's BatchNorm recomputation feeds images without boxes, which a "
                            "detector cannot train on; use the EMA (--ema) instead")
        require_pycocotools("detection's validation mAP")  # before an epoch is spent
        refuse_classification_only(config, "detector", "detection augments with photometric distortion, zoom-out, "
                                   "IoU crop and flip")


def _without_crowd(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The boxes and labels a detector trains on: crowd regions (COCO's iscrowd=1) left out."""
    crowd = target.get("iscrowd")
    if crowd is None or not bool(crowd.any()):
        return {"boxes": target["boxes"], "labels": target["labels"]}
    keep = crowd == 0
    return {"boxes": target["boxes"][keep], "labels": target["labels"][keep]}


TASK_CLASSES = {"classification": ClassificationTask, "segmentation": SegmentationTask,
                "detection": DetectionTask}

#: the model names each task trains (for the one-line "choose a ... model" hint)
TASK_MODELS = {"classification": "mobilenetv3_*", "segmentation": "lraspp_mobilenetv3_*",
               "detection": "ssdlite320_mobilenetv3_* / ssdlite_mobilenetv3_*"}


def get_task(name: str) -> ClassificationTask:
    if name not in TASK_CLASSES:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASK_CLASSES[name]()


def resolve_task(configured: str, *, data_task: str, model_task: str, dataset: str, model: str) -> str:
    """The run's task: `configured` unless "auto", else the data's; the data and the model must agree with it."""
    task = data_task if configured == "auto" else configured
    if data_task != task:
        raise UserError(f"task={task} but the dataset {dataset!r} is a {data_task} dataset")
    if model_task != task:
        raise UserError(f"the model {model} is a {model_task} model but the run's task is {task} (from "
                        f"{'the data' if configured == 'auto' else 'task'}); choose a {TASK_MODELS[task]} model "
                        f"(--model)")
    return task
