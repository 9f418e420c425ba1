"""Quantize a model to int8 after training (PTQ) and write an ExecuTorch program (.pte) for phones.

The PT2E flow with XNNPACK's quantizer: int8 per-channel weights (BatchNorm folded in), static int8
activations calibrated on --calibration-images images from DATA, passed through the weights' own eval
preprocessing.  DATA is a folder in ImageNet layout (calibration from its train/ images, or val/ when it has
none), fashion-mnist (its train split), or, for a training checkpoint, the run's own data by default.

A checkpoint of quantization-aware training (`mobilenetv3 train --qat`) is converted as it is: its
ranges were learnt in training, so there is no calibration (--calibration-images does not apply), and the
int8 program is compared with the fake-quantized model.

The program is loaded back with ExecuTorch's runtime and run beside the float32 model on DATA's validation
split (--limit-eval-batches K: its first K batches): the command prints the float32 and int8 top-1 and how
often the two agree on the top-1 class.  When the labels do not fit the classifier (ImageNet weights on a
folder of other classes) only the agreement is shown.  The file is not written (exit 1) when the agreement
is below --min-agreement (default 50%: a broken program, not an accuracy target; the accuracy cost is yours
to judge).  With --json the last line is one JSON object with these numbers and the file size.

Needs the optional ExecuTorch extra: pip install 'mobilenetv3[mobile]'.

examples:
  mobilenetv3 quantize --checkpoint runs/fm/checkpoints/best.pt --output fm_int8.pte
  mobilenetv3 quantize --checkpoint large.safetensors --data /data/imagenet --output large_int8.pte --batch 8
  mobilenetv3 quantize --checkpoint runs/fm-qat/checkpoints/best.pt --output fm_qat_int8.pte   # a --qat run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..deploy.engines import check_weights_file
from ..deploy.executorch import require_quantization
from ..errors import UserError
from ..files import file_sha256

HELP = "int8 post-training quantization to an ExecuTorch (XNNPACK) .pte, with its accuracy cost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="weights file (.safetensors) or training checkpoint")
    parser.add_argument("--data", default=None,
                        help="calibration and evaluation data: an ImageNet-layout folder or fashion-mnist "
                             "(default for a training checkpoint: its run's data)")
    parser.add_argument("--data-dir", default=None, help="where fashion-mnist is looked for first")
    parser.add_argument("--output", required=True, metavar="OUT.pte", help="the int8 ExecuTorch program to write")
    parser.add_argument("--calibration-images", type=int, default=512, metavar="N",
                        help="images observed to set the activation ranges (default 512)")
    parser.add_argument("--batch", type=int, default=1, metavar="N",
                        help="the program's fixed batch size (default 1; larger inputs run in chunks)")
    parser.add_argument("--limit-eval-batches", type=int, default=None, metavar="K",
                        help="compare float32 and int8 on the first K validation batches only (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=64, metavar="N", help="validation batch size (64)")
    parser.add_argument("--min-agreement", type=float, default=None, metavar="PCT",
                        help="refuse the program when int8 and float32 agree on fewer top-1 predictions (default 50)")
    parser.add_argument("--ema", action="store_true", help="quantize a training checkpoint's EMA weights")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="data-loading processes (default 0)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.calibration_images < 1:
        raise UserError(f"--calibration-images must be a positive number of images, got {args.calibration_images}")
    for name in ("batch", "eval_batch_size", "limit_eval_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.min_agreement is not None and not 0.0 <= args.min_agreement <= 100.0:
        raise UserError(f"--min-agreement is a percentage in [0, 100], got {args.min_agreement:g}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    output = Path(args.output)
    if output.suffix.lower() != ".pte":
        raise UserError(f"--output {args.output}: an ExecuTorch program's name ends in .pte")
    if output.is_dir():
        raise UserError(f"--output {args.output} is a directory")
    if not output.absolute().parent.is_dir():
        raise UserError(f"--output {args.output}: folder {output.absolute().parent} does not exist")


def run(args: argparse.Namespace) -> int:
    # heavy imports on use: `mobilenetv3 quantize --help` stays torch-free
    from ..deploy.export import artifact_metadata
    from ..deploy.quantize import (DEFAULT_MIN_AGREEMENT, QuantizationVerificationError, calibration_batches,
                                   describe_bytes, evaluation_batches, qat_model_from_checkpoint, qat_to_pte,
                                   quantize_data, quantize_to_pte, top1_line)
    from ..models.registry import get_entry
    from ..weights.io import build_model, read_weights

    logger = logging.getLogger("mobilenetv3.quantize")
    _check_arguments(args)
    require_quantization("mobilenetv3 quantize")
    kind = check_weights_file(args.checkpoint)
    if kind not in ("safetensors", "checkpoint"):
        raise UserError(f"{args.checkpoint} is already an export ({kind}); "
                        "quantize a weights file or training checkpoint")
    weights = read_weights(args.checkpoint, ema=args.ema)
    if weights.model_name and get_entry(weights.model_name).task == "detection":
        raise UserError(f"{args.checkpoint} holds a detector ({weights.model_name}); int8 quantization is for the "
                        "classifiers: export it in float (mobilenetv3 export --format executorch)")
    train_config = weights.extra.get("config") or {}  # a training checkpoint's run config
    data = quantize_data(args.data, weights.preprocessing, train_config, source=str(args.checkpoint),
                         data_dir=args.data_dir, workers=0 if args.workers is None else args.workers)
    qat = bool(weights.extra.get("qat"))  # a quantization-aware training checkpoint: convert, no calibration
    if qat:
        model, graph = qat_model_from_checkpoint(weights)
    else:
        model = build_model(weights).eval()
    num_classes = int(weights.model_kwargs.get("num_classes", 1000))
    labelled = num_classes == data.num_classes
    if not labelled:
        logger.warning("%s predicts %d classes but %s has %d: top-1 accuracy is not measured, only the "
                       "agreement of int8 with float32", args.checkpoint, num_classes, data.dataset, data.num_classes)
    metadata = artifact_metadata(model, weights.preprocessing, weights.class_names, file_sha256(args.checkpoint))
    min_agreement = DEFAULT_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement
    evaluation = evaluation_batches(data.val, labelled=labelled, batch_size=args.eval_batch_size,
                                    workers=data.workers, limit_batches=args.limit_eval_batches)
    try:
        if qat:
            logger.info("converting the QAT graph of %s (its ranges were learnt in training: no calibration) to "
                        "XNNPACK int8", args.checkpoint)
            report = qat_to_pte(graph, args.output, metadata, evaluation, batch=args.batch,
                                min_agreement=min_agreement)
        else:
            logger.info("calibrating on up to %d %s images of %s (%d px), then lowering to XNNPACK int8",
                        args.calibration_images, data.calibration_split, data.dataset, data.preprocessing.input_size)
            report = quantize_to_pte(
                model, calibration_batches(data.calibration, args.calibration_images, workers=data.workers),
                args.output, metadata, batch=args.batch, min_agreement=min_agreement, evaluation=evaluation)
    except QuantizationVerificationError as error:
        print(f"mobilenetv3 quantize: verification failed: {error}", file=sys.stderr)
        return 1
    comparison = report.comparison
    outside = report.outside_delegate
    delegated = ("" if outside is None else
                 f"; {sum(outside.values())} kernel call(s) outside {report.delegates} XNNPACK delegate(s)")
    source = ("from quantization-aware training" if qat else
              f"calibrated on {report.calibration_images} {data.calibration_split} images")
    print(f"wrote {report.path} (int8 ExecuTorch/XNNPACK, input {report.input_size}, batch {report.batch}, "
          f"{describe_bytes(report.pte_bytes)}; {source}{delegated})")
    line = top1_line(comparison, report.reference)
    where = f"{comparison.images} val images of {data.dataset}"
    if line:
        print(f"{line}  on {where}")
    print(f"int8 agrees with {report.reference} on {comparison.agreement:.2f}% of top-1 predictions "
          f"({comparison.agree}/{comparison.images}; required >= {min_agreement:g}%)")
    if args.json:
        calibration = {"calibration_images": None, "calibration_split": None} if qat else {
            "calibration_split": data.calibration_split}
        print(json.dumps(report.to_dict() | {"data": data.dataset} | calibration))
    return 0
