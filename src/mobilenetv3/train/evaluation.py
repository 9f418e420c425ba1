"""Evaluate a weights file, a training checkpoint or an ExecuTorch program on a dataset (`mobilenetv3 eval`).

On a training checkpoint the data settings, preprocessing, batch size, precision (`amp`) and memory layout
(`channels_last`) are the run's own, so the numbers reproduce what training logged for that checkpoint; on a
weights file the stored preprocessing is used, in full precision.  `input_size` / `crop_pct` / `amp` override
either.  `tta="flip"` scores each image as the mean of the logits of two views, as is and mirrored left-right
(test-time augmentation: twice the compute, and not the single-view protocol that training logs or that
published accuracies use unless they say so).

A `.pte` (ExecuTorch program: `export --format executorch`, or an int8 one from `quantize`) is evaluated
itself, in ExecuTorch's runtime on the CPU, with the preprocessing embedded in it (its input size is fixed:
`input_size` may only repeat it); its fixed batch size is padded to.  It needs the `[mobile]` extra.

`logged` is what training logged for a checkpoint (its metrics row); `logged_data` says what that validation
ran on (dataset, samples, input size, crop) and `logged_differs` which of those this evaluation changed: any
of them makes the two sets of numbers incomparable, which is not a failed reproduction.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import DataConfig, build_datasets, collate_skipping, same_dataset
from ..deploy.engines import check_weights_file
from ..deploy.executorch import load_pte, pte_module, pte_weights, require_executorch
from ..errors import UserError
from ..models.registry import get_entry
from ..weights.io import build_model, read_weights
from .distributed import DistEnv, resolve_device
from .loop import AMP_DTYPES, StepSettings, evaluate
from .tasks import get_task

logger = logging.getLogger(__name__)

TTA_MODES = ("flip",)


class FlipAveraged(nn.Module):
    """The model's logits averaged over the image and its left-right mirror (two-view test-time augmentation)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model(images) + self.model(images.flip(-1))) / 2


def evaluate_file(
    path: str | Path,
    dataset: str,
    *,
    data_dir: str | None = None,
    input_size: int | None = None,
    crop_pct: float | None = None,
    ema: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    limit_batches: int | None = None,
    device: str = "auto",
    tta: str | None = None,
    amp: str | None = None,
) -> dict[str, Any]:
    if tta is not None and tta not in TTA_MODES:
        raise UserError(f"unknown test-time augmentation {tta!r}; choose from {', '.join(TTA_MODES)}")
    if amp is not None and amp not in AMP_DTYPES:
        raise UserError(f"unknown amp mode {amp!r}; choose from {', '.join(AMP_DTYPES)}")
    path = Path(path)
    is_pte = path.suffix.lower() == ".pte"
    if is_pte and device not in ("auto", "cpu"):
        raise UserError(f"{path} is an ExecuTorch program, which runs on the CPU: drop --device {device}")
    try:  # first: a misspelt device fails before any reading
        env = DistEnv(device=resolve_device("cpu" if is_pte else device, 0))
    except RuntimeError as error:  # torch.device("gpu"), an index past the last GPU, ...
        raise UserError(f"--device {device}: {str(error).strip().splitlines()[0]}") from None
    program = None
    if is_pte:
        program, weights = _read_pte(path, ema=ema, amp=amp, input_size=input_size)
    else:
        weights = read_weights(path, ema=ema)
    train_config: dict[str, Any] = weights.extra.get("config") or {}  # a training checkpoint's run config
    data_cfg = DataConfig.for_run(
        train_config.get("data"), dataset, data_dir=data_dir, workers=workers,
        input_size=input_size if input_size is not None else weights.preprocessing.input_size,
        crop_pct=crop_pct if crop_pct is not None else weights.preprocessing.crop_pct)
    task = get_task(get_entry(weights.model_name).task if weights.model_name else "classification")
    if task.name == "detection":
        from ..data.detection import require_pycocotools

        require_pycocotools(f"evaluating the detector {path.name}")  # before any inference
    num_classes = int(weights.model_kwargs.get("num_classes", 1000))
    # a segmentation folder without classes.txt takes the checkpoint's classes (its val split may lack the last)
    classes = weights.class_names or [f"class_{i}" for i in range(num_classes)]
    bundle = build_datasets(data_cfg, need_train=False, preprocessing=weights.preprocessing,
                            class_names=classes if task.name == "segmentation" else None)

    if program is not None:
        if task.name == "detection":
            raise UserError(f"{path} is a detector's program (raw head outputs); evaluate its weights file or "
                            "training checkpoint instead")
        model = pte_module(program)
    elif task.name == "detection" and input_size is not None:
        # the detector resizes inside itself: --input-size is its `size` (anchors are relative to it)
        model = build_model(weights, size=[input_size, input_size])
    else:
        model = build_model(weights)
    if bundle.task != task.name:
        raise UserError(f"{path} holds a {task.name} model but {dataset!r} is a {bundle.task} dataset")
    if tta is not None and task.name != "classification":
        raise UserError(f"--tta {tta} is for classification models; {path} holds a {task.name} model")
    if num_classes != bundle.num_classes:
        raise UserError(f"{path} predicts {num_classes} classes but {dataset!r} has {bundle.num_classes}")
    if weights.class_names and list(weights.class_names) != list(bundle.class_names):
        logger.warning("the class names of %s differ from the dataset's; labels are compared by index", path)

    amp = amp if amp is not None else str(train_config.get("amp", "none"))
    # the run's layout too: channels_last convolutions round differently from NCHW ones (on CUDA; eager CPU
    # inference runs channels_last inside whatever the layout, as training's validation did)
    channels_last = bool(train_config.get("channels_last", False))
    model.to(env.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if tta == "flip":
        model = FlipAveraged(model)
    batch_size = batch_size or bundle.val_batch_size or int(train_config.get("batch_size", 64))
    loader = DataLoader(bundle.val, batch_size=batch_size, shuffle=False, num_workers=data_cfg.workers,
                        collate_fn=collate_skipping, pin_memory=env.device.type == "cuda")
    settings = StepSettings(device=env.device, amp_dtype=AMP_DTYPES[amp], channels_last=channels_last,
                            accumulation_steps=1, grad_clip_norm=None, label_smoothing=0.0,
                            num_classes=bundle.num_classes, task=task)
    with torch.inference_mode(False):
        result = evaluate(model, loader, settings, num_batches=limit_batches, env=env, progress_label="eval")
    logged = weights.extra.get("metrics")
    result.update(task=task.name, checkpoint=str(path), ema=ema, tta=tta, amp=amp,
                  preprocessing=bundle.preprocessing.to_dict(),
                  logged=logged)
    if logged:
        trained = {
            "dataset": train_config.get("data", {}).get("dataset"), "samples": logged.get("val_samples"),
            "input_size": weights.preprocessing.input_size, "crop_pct": weights.preprocessing.crop_pct,
            "limit_batches": train_config.get("limit_val_batches"),
        }
        used = {"samples": result["samples"], "input_size": bundle.preprocessing.input_size,
                "crop_pct": bundle.preprocessing.crop_pct}
        differs = [key for key in ("samples", "input_size", "crop_pct")
                   if trained[key] is not None and trained[key] != used[key]]
        if trained["dataset"] is not None and not same_dataset(trained["dataset"], dataset):
            differs.insert(0, "dataset")
        result.update(logged_data=trained, logged_differs=differs)
    return result


def _read_pte(path: Path, *, ema: bool, amp: str | None, input_size: int | None):
    """(the loaded ExecuTorch program, a `LoadedWeights` without tensors describing it), or a UserError for
    options that cannot apply to a fixed program."""
    check_weights_file(path)  # missing, a directory, or not a program: one line before the extra is asked for
    require_executorch(f"evaluating {path.name}")
    if ema:
        raise UserError(f"{path} is an ExecuTorch program; --ema applies to training checkpoints only")
    if amp not in (None, "none"):
        raise UserError(f"{path} is an ExecuTorch program with its own precision; --amp does not apply")
    program = load_pte(path)
    weights = pte_weights(program)
    size = program.input_shape[-1]
    weights.preprocessing = weights.preprocessing.replace(input_size=size)  # what the program takes
    if input_size is not None and input_size != size:
        raise UserError(f"{path} was exported for {size}px inputs, not {input_size}; export it again with "
                        "--input-size")
    return program, weights
