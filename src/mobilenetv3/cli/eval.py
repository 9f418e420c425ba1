"""Evaluate a training checkpoint, a weights file or an ExecuTorch .pte program: top-1 / top-5 / loss; for a
segmentation model (LR-ASPP) mIoU / pixel accuracy / per-class IoU / pixel loss; for a detector (SSDLite) COCO
box mAP@[.5:.95] / mAP@.5 / mAP@.75 (pycocotools) and torchvision's SSD loss.

On a training checkpoint it uses the run's preprocessing, data settings, precision (amp) and memory
layout, and reproduces the validation numbers training logged for that checkpoint; on a weights file it
uses the stored preprocessing in full precision.  --input-size / --crop-pct / --amp override.  With
--json the last line is {"top1": ..., "top5": ..., "loss": ..., "samples": ...}.  --tta flip averages the
logits of each image and its mirror image (two forward passes; training's logged numbers are single-view)
and adds "tta": "flip" to that line; a segmentation model's line is {"miou": ..., "pixel_acc": ...,
"iou": [per class, null where absent], "loss": ..., "samples": ...}, a detector's {"map": ..., "map_50": ...,
"map_75": ..., "loss": ..., "samples": ...}.  Beside a checkpoint's logged numbers it
shows their sample count, and a note when this evaluation's data, sample count (e.g. --limit-batches) or
preprocessing differs from what training validated on: then the numbers are not comparable.

A .pte (`export --format executorch`, or an int8 program from `quantize`; needs pip install
'mobilenetv3[mobile]') is evaluated itself, in ExecuTorch's runtime on the CPU, with the preprocessing
embedded in it: the accuracy of the program that ships, quantization included.

examples:
  mobilenetv3 eval --checkpoint runs/fm/checkpoints/best.pt --data fashion-mnist
  mobilenetv3 eval --checkpoint mobilenetv3_large_100.safetensors --data /data/imagenet --json
  mobilenetv3 eval --checkpoint small_int8.pte --data fashion-mnist
  mobilenetv3 eval --checkpoint runs/seg/checkpoints/best.pt --data fashion-mnist-seg
"""

from __future__ import annotations

import argparse
import json

from ..errors import UserError

HELP = "evaluate a checkpoint, weights file or .pte program on a dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="training checkpoint, .safetensors or .pte")
    parser.add_argument("--data", required=True, help="fashion-mnist, synthetic, or an ImageNet-layout folder (val/)")
    parser.add_argument("--data-dir", default=None, help="where fashion-mnist is looked for first")
    parser.add_argument("--input-size", type=int, default=None, metavar="R",
                        help="crop size in pixels; default: the weights' own (a training checkpoint's run's)")
    parser.add_argument("--crop-pct", type=float, default=None, metavar="P",
                        help="resize to R / P, then centre-crop R; default: the weights' own")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    # the choices are evaluation.TTA_MODES, spelled out so that `--help` does not import torch
    parser.add_argument("--tta", choices=["flip"], default=None,
                        help="test-time augmentation: flip = mean logits of the image and its left-right mirror")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None,
                        help="autocast dtype; default: a training checkpoint's own (its run's amp), else none")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size, else 64")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="data-loading processes; default: the run's data.workers, else 2")
    parser.add_argument("--limit-batches", type=int, default=None, metavar="N",
                        help="evaluate only the first N batches (default: all)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def run(args: argparse.Namespace) -> int:
    from ..train.evaluation import evaluate_file  # torch on use: `mobilenetv3 eval --help` stays torch-free

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.limit_batches is not None and args.limit_batches < 1:
        raise UserError(f"--limit-batches must be positive, got {args.limit_batches}")
    result = evaluate_file(
        args.checkpoint, args.data, data_dir=args.data_dir, input_size=args.input_size, crop_pct=args.crop_pct,
        ema=args.ema, batch_size=args.batch_size, workers=args.workers, limit_batches=args.limit_batches,
        device=args.device, tta=args.tta, amp=args.amp,
    )
    prep = result["preprocessing"]
    used = (("EMA", args.ema), ("flip TTA", args.tta), (result["amp"], result["amp"] != "none"))
    labels = [label for label, on in used if on]
    task = result.get("task", "classification")
    print(f"{args.checkpoint}{' (%s)' % ', '.join(labels) if labels else ''} on {args.data} "
          f"({prep['input_size']}px, crop {prep['crop_pct']}): {_scores(result, '', task)}  "
          f"({result['samples']} samples{', %d unreadable skipped' % result['skipped'] if result['skipped'] else ''})")
    logged = result.get("logged")
    if logged:
        prefix = "ema_val_" if args.ema else "val_"
        trained = result["logged_data"]
        samples = f"  ({trained['samples']} samples)" if trained["samples"] is not None else ""
        print(f"training logged for this checkpoint (epoch {logged['epoch']}{', single view' if args.tta else ''}): "
              f"{_scores(logged, prefix, task)}{samples}")
        if result["logged_differs"]:
            print(_not_comparable_note(trained, result, args))
    if args.json:
        # "tta" only appears with --tta, so single-view output keeps the four documented keys
        keys = JSON_KEYS[task]
        print(json.dumps({key: result[key] for key in keys} | ({"tta": args.tta} if args.tta else {})))
    return 0


#: the --json line's keys, by the model's task
JSON_KEYS = {"classification": ("top1", "top5", "loss", "samples"),
             "segmentation": ("miou", "pixel_acc", "iou", "loss", "samples"),
             "detection": ("map", "map_50", "map_75", "loss", "samples")}


def _scores(values: dict, prefix: str, task: str) -> str:
    """'top-1 91.20%  top-5 99.80%  loss 0.3010', 'mIoU 71.30%  pixel acc 95.10%  loss 0.1200' (a segmentation
    model's) or 'mAP 21.30%  mAP@.5 34.10%  mAP@.75 20.90%  loss 2.5000' (a detector's), from an evaluation
    result (prefix '') or a logged metrics row ('val_', 'ema_val_')."""
    if task == "segmentation":
        return (f"mIoU {values[prefix + 'miou']:.2f}%  pixel acc {values[prefix + 'pixel_acc']:.2f}%  "
                f"loss {values[prefix + 'loss']:.4f}")
    if task == "detection":
        return (f"mAP {values[prefix + 'map']:.2f}%  mAP@.5 {values[prefix + 'map_50']:.2f}%  "
                f"mAP@.75 {values[prefix + 'map_75']:.2f}%  loss {values[prefix + 'loss']:.4f}")
    return (f"top-1 {values[prefix + 'top1']:.2f}%  top-5 {values[prefix + 'top5']:.2f}%  "
            f"loss {values[prefix + 'loss']:.4f}")


def _not_comparable_note(trained: dict, result: dict, args: argparse.Namespace) -> str:
    """'note: training validated on fashion-mnist (10000 samples); this evaluation used fashion-mnist (320 samples,
    --limit-batches 5), so the numbers are not comparable', naming only what tells the two apart."""
    differs, prep = result["logged_differs"], result["preprocessing"]

    def describe(dataset: str | None, samples: int | None, input_size: int, crop_pct: float, limit: str) -> str:
        parts = [f"{samples} samples" if samples is not None else "",
                 limit if "samples" in differs else "",
                 f"{input_size}px" if "input_size" in differs else "",
                 f"crop {crop_pct}" if "crop_pct" in differs else ""]
        details = ", ".join(part for part in parts if part)
        return f"{dataset or 'its data'}{f' ({details})' if details else ''}"

    limit = trained.get("limit_batches")
    before = describe(trained["dataset"], trained["samples"], trained["input_size"], trained["crop_pct"],
                      f"limit_val_batches {limit}" if limit else "")
    now = describe(args.data, result["samples"], prep["input_size"], prep["crop_pct"],
                   f"--limit-batches {args.limit_batches}" if args.limit_batches else "")
    return f"note: training validated on {before}; this evaluation used {now}, so the numbers are not comparable"
