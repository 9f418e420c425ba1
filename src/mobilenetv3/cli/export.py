"""Export a model to ONNX, TorchScript or a torch.export ExportedProgram, verified against eager PyTorch.

BatchNorm is folded into the convolutions.  After writing, the artifact is loaded back with its own
runtime (ONNX Runtime, torch.jit.load, torch.export.load), run on random inputs at two batch sizes and
compared with eager PyTorch; the command fails (exit 1, no file written) if the largest difference is
above --tolerance (1e-4) x max(1, largest |output|): an absolute 1e-4 for logits within +-1, relative to
the logits' scale beyond, where float32 itself is not exact to 1e-4.

examples:
  mobilenetv3 export --checkpoint large.safetensors --format onnx --output large.onnx
  mobilenetv3 export --checkpoint runs/exp/last.pt --format torchscript --output model.pt --batch 8
  mobilenetv3 export --model mobilenetv3_small_100 --format exported-program --output small.pt2
"""

from __future__ import annotations

import argparse
import json

HELP = "export to onnx / torchscript / exported-program, verified against eager"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="FILE", help="weights file (.safetensors) or training checkpoint")
    source.add_argument("--model", metavar="NAME", help="a registered model name, with random weights")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"])
    parser.add_argument("--output", required=True, metavar="OUT", help="artifact path")
    parser.add_argument("--input-size", type=int, default=None, metavar="R",
                        help="square input resolution (default: the weights' preprocessing, else 224)")
    parser.add_argument("--batch", default="dynamic", metavar="dynamic|N",
                        help="'dynamic' (default) for a dynamic batch axis, or a fixed batch size")
    parser.add_argument("--opset", type=int, default=None, metavar="K", help="ONNX opset (default 18)")
    parser.add_argument("--num-classes", type=int, default=None, help="with --model: classifier size")
    parser.add_argument("--ema", action="store_true", help="with a training checkpoint: export its EMA weights")
    parser.add_argument("--tolerance", type=float, default=None, help="allowed max abs difference, in units of max(1, max |output|) (default 1e-4)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def parse_batch(value: str) -> int | None:
    from ..errors import UserError

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
    import sys

    from ..files import file_sha256
    from ..deploy.export import (DEFAULT_OPSET, DEFAULT_TOLERANCE, ExportFormat, ExportVerificationError,
                                 artifact_metadata, export_model)
    from ..errors import UserError
    from ..models.registry import create_model
    from ..preprocessing import Preprocessing
    from ..weights.io import load_model

    fmt = ExportFormat.parse(args.format)
    batch = parse_batch(args.batch)
    if args.opset is not None and fmt is not ExportFormat.ONNX:
        raise UserError("--opset applies to --format onnx only")
    if args.checkpoint:
        if args.num_classes is not None:
            raise UserError("--num-classes applies to --model only (a checkpoint fixes its classifier)")
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
        print(f"wrote {report.path} ({fmt.value}, input {report.input_size}, batch "
              f"{'dynamic' if batch is None else batch}, {report.batchnorms_folded} BatchNorms folded)")
        print(f"verified against eager PyTorch at batch {sizes}: max abs diff {report.max_abs_diff:.3g} "
              f"(max |output| {report.output_scale:.3g}, allowed {report.to_dict()['allowed_diff']:.3g})")
    return 0
