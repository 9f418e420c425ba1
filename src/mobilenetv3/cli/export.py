"""Export a model to ONNX, TorchScript, a torch.export ExportedProgram or an ExecuTorch program, verified first.

BatchNorm is folded into the convolutions.  The artifact is loaded back with its own runtime (ONNX
Runtime, torch.jit.load, torch.export.load, ExecuTorch's runtime), run at two batch sizes (one when the
batch is fixed) on smooth random images in the data's range (uniform pixels on a coarse grid,
interpolated, then normalised as the weights' preprocessing says),
and compared with the unfused model evaluated in float64; float32 eager PyTorch is compared with it too.
The command fails (exit 1, no file written) unless

  max |artifact - float64| <= max(4 x max |eager float32 - float64|, --tolerance x max(1, max |output|))

i.e. the artifact may be as inexact as float32 itself is on these inputs (the 4x margin is measured by
benchmarks/export_verification.py on several kinds of input; docs/results.md), and
is always allowed --tolerance (1e-4) in units of the logits' scale.

Segmentation models (LR-ASPP): the artifact's one output is the logits tensor (N, classes, H, W), named
"logits" (not torchvision's {"out": ...} dict); onnx and exported-program exports have a dynamic batch,
height and width (32 to 8192 px), torchscript takes any size, and each is verified at the square
--input-size and at a wide and a tall size besides.  An executorch program has one fixed size (--input-size).

Without --format, the format follows --output: .onnx, .pt2 (exported-program), .torchscript.pt or .ts
(torchscript), .pte (executorch).  A --format that contradicts the output's name is refused.

Detection models (SSDLite): the artifact is the network up to its raw head outputs, at the model's own fixed
size (its anchors depend on it; another --input-size is refused), batch dynamic except in executorch programs:
  input   "input"            [N, C, H, W] float32: pixels in [0, 1] resized to the model's size, not normalised
  outputs "bbox_regression"  [N, A, 4]  box deltas against each anchor (torchvision's BoxCoder, weights 10,10,5,5)
          "cls_logits"       [N, A, K]  class logits, class 0 the background
          "anchors"          [A, 4]     a constant: the default boxes, x0 y0 x1 y1 in input pixels
mobilenetv3.deploy.detection.decode(*outputs, **decode_settings(metadata), image_sizes=...) turns them into
torchvision's {boxes, labels, scores} (the eager model's own detections); the metadata carries the input size,
the thresholds and the class names.  Each output is verified against float64 as above.

--format executorch (needs pip install 'mobilenetv3[mobile]') writes a float32 program for ExecuTorch's
on-device runtime, its operators delegated to XNNPACK (ARM and x86 CPUs), with the metadata embedded.
Its batch size is fixed: 1 unless --batch N says otherwise (a caller pads the last batch; `predict`,
`eval` and `bench` do).

examples:
  mobilenetv3 export --checkpoint large.safetensors --output large.onnx
  mobilenetv3 export --checkpoint runs/exp/checkpoints/last.pt --format torchscript --output model.pt --batch 8
  mobilenetv3 export --model mobilenetv3_small_100 --output small.pt2
  mobilenetv3 export --checkpoint large.safetensors --output large.pte
  mobilenetv3 export --checkpoint ssdlite.safetensors --output ssdlite.onnx
"""

from __future__ import annotations

import argparse
import json
import sys

from ..deploy.engines import check_weights_file
from ..deploy.executorch import require_executorch
from ..errors import UserError
from ..files import file_sha256
from ..preprocessing import Preprocessing

HELP = "export to onnx / torchscript / exported-program / executorch (.pte), verified against eager"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="FILE", help="weights file (.safetensors) or training checkpoint")
    source.add_argument("--model", metavar="NAME", help="a registered model name, with random weights")
    parser.add_argument("--format", default=None, choices=["onnx", "torchscript", "exported-program", "executorch"],
                        help="default: from --output's name (.onnx, .pt2, .torchscript.pt / .ts, .pte)")
    parser.add_argument("--output", required=True, metavar="OUT", help="artifact path")
    parser.add_argument("--input-size", type=int, default=None, metavar="R",
                        help="square input resolution (default: the weights' preprocessing, else 224)")
    parser.add_argument("--batch", default=None, metavar="dynamic|N",
                        help="'dynamic' for a dynamic batch axis (the default), or a fixed batch size; "
                             "executorch programs have a fixed batch size (default 1)")
    parser.add_argument("--opset", type=int, default=None, metavar="K", help="ONNX opset (default 18)")
    parser.add_argument("--num-classes", type=int, default=None, help="with --model: classifier size")
    parser.add_argument("--ema", action="store_true", help="with a training checkpoint: export its EMA weights")
    parser.add_argument("--tolerance", type=float, default=None, metavar="T",
                        help="the least difference from float64 always allowed, in units of max(1, max |output|) "
                             "(default 1e-4); beyond it, up to 4x float32 eager's own difference is allowed")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def parse_batch(value: str) -> int | None:
    if value == "dynamic":
        return None
    try:
        batch = int(value)
    except ValueError:
        raise UserError(f"--batch must be 'dynamic' or a positive integer, got {value!r}") from None
    if batch < 1:
        raise UserError(f"--batch must be 'dynamic' or a positive integer, got {value!r}")
    return batch


def run(args: argparse.Namespace) -> int:
    # heavy imports on use: `mobilenetv3 export --help` stays torch-free
    from ..deploy.export import (DEFAULT_OPSET, DEFAULT_TOLERANCE, ExportFormat, ExportVerificationError,
                                 artifact_metadata, check_detector_input_size, export_model, model_task)
    from ..factory import create_model
    from ..weights.io import load_model

    fmt = ExportFormat.for_output(args.output, args.format)
    if fmt is ExportFormat.EXECUTORCH:
        require_executorch("--format executorch")  # before any loading
        if args.batch == "dynamic":
            raise UserError("--format executorch exports a fixed batch size: pass --batch N (default 1); "
                            "predict, eval and bench pad the last batch")
    batch = parse_batch(args.batch or "dynamic")  # executorch: None becomes export.EXECUTORCH_DEFAULT_BATCH
    if args.opset is not None and fmt is not ExportFormat.ONNX:
        raise UserError("--opset applies to --format onnx only")
    if args.checkpoint:
        if args.num_classes is not None:
            raise UserError("--num-classes applies to --model only (a checkpoint fixes its classifier)")
        kind = check_weights_file(args.checkpoint)
        if kind in ("onnx", "executorch"):
            raise UserError(f"{args.checkpoint} is already an {'ONNX' if kind == 'onnx' else 'ExecuTorch'} export; "
                            "export a weights file or training checkpoint")
        model = load_model(args.checkpoint, ema=args.ema)
        digest = file_sha256(args.checkpoint)
    else:
        if args.ema:
            raise UserError("--ema applies to --checkpoint only")
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = create_model(args.model, **kwargs).eval()
        model.preprocessing = Preprocessing(in_chans=model.config["in_chans"])
        model.class_names = None
        digest = None
    detector = model_task(model) == "detection"
    if detector:  # its own size only (the anchors depend on it): refused before any work
        check_detector_input_size(model, args.input_size)
        size = args.input_size
    else:
        size = args.input_size or model.preprocessing.input_size
    metadata = artifact_metadata(model, model.preprocessing.replace(input_size=size), model.class_names, digest)
    try:
        report = export_model(
            model, args.output, fmt, input_size=size, batch=batch, opset=args.opset or DEFAULT_OPSET,
            metadata=metadata, tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
        )
    except ExportVerificationError as error:
        print(f"mobilenetv3 export: verification failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        sizes = ", ".join(str(b) for b in report.checked_batch_sizes)
        if len(report.checked_sizes) > 1:  # segmentation: dynamic height and width
            sizes += " and at " + ", ".join(f"{h}x{w}" for h, w in report.checked_sizes)
        input_desc = (f"input HxW dynamic, checked from {report.input_size}" if len(report.checked_sizes) > 1
                      else f"input {report.input_size}")
        if detector:
            (height, width), = report.checked_sizes
            input_desc = f"input {height}x{width} pixels in [0, 1], size fixed"
        print(f"wrote {report.path} ({fmt.value}, {input_desc}, batch "
              f"{'dynamic' if report.batch is None else report.batch}, {report.batchnorms_folded} BatchNorms folded)")
        print(f"verified against float64 at batch {sizes}: max abs diff {report.max_abs_diff:.3g}, float32 eager's "
              f"own {report.eager_float32_diff:.3g} (max |output| {report.output_scale:.3g}, "
              f"allowed {report.allowed_diff:.3g})")
        for name, part in report.outputs.items():
            print(f"  output {name}: max abs diff {part.artifact_diff:.3g} (allowed {part.allowed(report.tolerance):.3g})")
        if detector:
            print("outputs bbox_regression [N, A, 4], cls_logits [N, A, K], anchors [A, 4]: decode them with "
                  "mobilenetv3.deploy.detection.decode")
    return 0
