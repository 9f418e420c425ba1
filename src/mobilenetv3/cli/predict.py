"""Classify, segment or detect objects in images with a weights file, a training checkpoint, an exported .onnx file or a .pte program.

Each INPUT is an image file or a folder (scanned recursively).  The resize / crop / normalisation
and the class names come from the weights' metadata (ImageNet's names for a 1000-class model without
names).  The default engine is ONNX Runtime when installed: the weights are exported to ONNX once,
verified on a few of the input images, and cached by the weights' sha256 ($MOBILENETV3_CACHE, default
~/.cache/mobilenetv3).  If that export cannot be made or verified, a warning says so and eager PyTorch
runs instead.  Decoding runs in threads, overlapped with inference.

A .pte (ExecuTorch program, from `export --format executorch` or `quantize`; needs pip install
'mobilenetv3[mobile]') runs in ExecuTorch's runtime, with the preprocessing and class names embedded in
it; its fixed batch size is padded to.

Segmentation models (LR-ASPP; told by the weights' metadata): each image is resized (short side to the
weights' resize size, nothing cropped; a .pte program: to its fixed size), and per image a class-index mask
PNG (NAME_mask.png, 8-bit, at the image's own size: the logits are resized back before the argmax) and an
overlay PNG (NAME_overlay.png, the classes drawn over the image, the background left clear) are written
under --output-dir, mirroring the inputs' folders.  Each printed line (or --json object) gives the per-class
pixel fractions, which sum to 1.

Detection models (SSDLite; told by the weights' metadata): each image (any size; grey for a 1-channel model)
is resized to the model's size, the network's raw outputs are decoded (mobilenetv3.deploy.detection.decode:
torchvision's post-processing, boxes scaled back to the image), and NAME_boxes.png (the image with the boxes,
labelled with class names and scores) is written under --output-dir.  Each printed line (or --json object:
{"path", "boxes_png", "width", "height", "detections": [{"label", "class_name", "score", "box": [x0, y0, x1,
y1]}]}, boxes in the original image's pixels) lists the detections scoring above --score-thresh (default 0.3:
the model's own 0.001 threshold is for measuring mAP, not for looking at).

Unreadable images are reported on stderr and skipped.  Exit status: 0 all images classified,
1 some were skipped, 2 usage error (no images, bad weights file, ...).

examples:
  mobilenetv3 predict --checkpoint large.safetensors photos/ cat.jpg
  mobilenetv3 predict --checkpoint large.safetensors --topk 1 --json photos/ > predictions.jsonl
  mobilenetv3 predict --checkpoint large_int8.pte photos/
  mobilenetv3 predict --checkpoint seg.safetensors --output-dir masks/ --json street/ > fractions.jsonl
  mobilenetv3 predict --checkpoint ssdlite.safetensors --score-thresh 0.5 --json photos/ > boxes.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..deploy.engines import make_engine
from ..deploy.executorch import require_executorch
from ..deploy.predict import Skipped, find_images, predict_files, predict_segmentation_files
from ..deploy.runtime import check_weights_file, class_names_for, metadata_preprocessing, split_threads, task_for
from ..errors import UserError

HELP = ("classify image files and folders (top-k, JSON lines), segment them (mask and overlay PNGs) or detect "
        "objects (boxes, drawn into PNGs)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (recursive)")
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="weights file (.safetensors), training checkpoint, exported .onnx or .pte")
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="classes per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per engine call (default 32)")
    parser.add_argument("--engine", choices=["auto", "torch", "onnxruntime", "executorch"], default="auto",
                        help="auto (default): executorch for a .pte, else onnxruntime if installed, else torch")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads (default: the CPUs not decoding; oversubscribing is slow)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: a quarter of the CPUs, >= 1)")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per image: {"path", "topk": [{"index", "label", "prob"}]}; '
                             'segmentation: {"path", "mask", "overlay", "fractions": {class: fraction}}; '
                             'detection: {"path", "boxes_png", "width", "height", "detections": '
                             '[{"label", "class_name", "score", "box": [x0, y0, x1, y1]}]}')
    parser.add_argument("--output-dir", default="predictions", metavar="DIR",
                        help="segmentation and detection models: where the mask and overlay PNGs, or the "
                             "NAME_boxes.png drawings, go (default predictions/)")
    parser.add_argument("--score-thresh", type=float, default=None, metavar="S",
                        help="detection models: the detections shown and drawn score above S (default 0.3)")


def run(args: argparse.Namespace) -> int:
    if args.topk < 1 or args.batch_size < 1:
        raise UserError(f"--topk and --batch-size must be positive, got {args.topk} and {args.batch_size}")
    if args.score_thresh is not None and not 0.0 <= args.score_thresh < 1.0:
        raise UserError(f"--score-thresh is a score in [0, 1), got {args.score_thresh:g}")
    if check_weights_file(args.checkpoint) == "executorch":  # before anything is scanned, announced or exported
        require_executorch(f"running {Path(args.checkpoint).name}")
    paths = find_images(args.inputs)
    if not paths:
        raise UserError(f"no image files found in {' '.join(args.inputs)}")
    threads, workers = split_threads(args.workers, args.threads)
    # A new ONNX export is verified on a few of these images (their own range and statistics).
    engine = make_engine(args.engine, args.checkpoint, threads=threads, images=paths)
    metadata = engine.metadata
    preprocessing = metadata_preprocessing(metadata, args.checkpoint)
    task = task_for(metadata)
    if args.score_thresh is not None and task != "detection":
        raise UserError(f"--score-thresh applies to detection models; {args.checkpoint} is a {task} model")
    if task == "detection":
        # torch and torchvision (decoding, drawing) only for a detector
        from ..deploy.detection import DISPLAY_SCORE_THRESH, predict_detection_files

        score_thresh = DISPLAY_SCORE_THRESH if args.score_thresh is None else args.score_thresh
        results = predict_detection_files(paths, engine, metadata, args.output_dir,
                                          class_names=class_names_for(metadata), score_thresh=score_thresh,
                                          batch_size=args.batch_size, workers=workers)
    elif task == "segmentation":
        # a .pte program has one fixed input size: images are resized to it rather than by their short side
        results = predict_segmentation_files(paths, engine, preprocessing, args.output_dir,
                                             class_names=class_names_for(metadata), workers=workers,
                                             square=getattr(engine, "name", "") == "executorch")
    else:
        results = predict_files(paths, engine, preprocessing, class_names=class_names_for(metadata),
                                topk=args.topk, batch_size=args.batch_size, workers=workers)
    skipped = 0
    for result in results:
        if isinstance(result, Skipped):
            skipped += 1
            continue
        print(json.dumps(result.to_dict()) if args.json else result.to_text())
    if skipped:
        print(f"mobilenetv3 predict: skipped {skipped} of {len(paths)} images (unreadable)", file=sys.stderr)
    return 1 if skipped else 0
