"""Average the weights of several checkpoints (as torchvision did for its MobileNetV3 weights).

examples:
  mobilenetv3 average runs/a/checkpoints/epoch_0008.pt runs/a/checkpoints/epoch_0009.pt -o avg.safetensors
  mobilenetv3 average --run runs/a --last 3 -o avg.safetensors     # needs checkpoint.keep_last_epochs >= 3
  mobilenetv3 average --run runs/a --best 3 --metric val_top1 --ema -o avg.pt
"""

from __future__ import annotations

import argparse
import json

from ..errors import UserError

HELP = "average the weights of the last/best k checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoints or weights files")
    parser.add_argument("-o", "--output", required=True, help=".safetensors weights file, or a .pt checkpoint")
    parser.add_argument("--run", default=None, metavar="DIR", help="take checkpoints/epoch_*.pt of this run")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--last", type=int, default=None, metavar="K",
                           help="with --run: the last K epochs (train with checkpoint.keep_last_epochs >= K)")
    selection.add_argument("--best", type=int, default=None, metavar="K",
                           help="with --run: the K best epochs by --metric (train with checkpoint.keep_best_epochs >= K)")
    parser.add_argument("--metric", default="val_top1", help="what --best ranks by (default val_top1)")
    parser.add_argument("--ema", action="store_true", help="average the EMA weights instead")


def run(args: argparse.Namespace) -> int:
    # torch on use: `mobilenetv3 average --help` stays torch-free
    from ..train.averaging import average_files, select_from_run

    paths = list(args.checkpoints)
    if args.run:
        if paths:
            raise UserError("give checkpoints or --run DIR, not both")
        if args.last is None and args.best is None:
            raise UserError("--run needs --last K or --best K")
        k = args.last if args.last is not None else args.best
        if k < 1:
            raise UserError(f"K must be >= 1, got {k}")
        paths = select_from_run(args.run, last=args.last, best=args.best, metric=args.metric)
    elif args.last is not None or args.best is not None:
        raise UserError("--last / --best select from --run DIR")
    if len(paths) < 1:
        raise UserError("give at least one checkpoint (or --run DIR --last K)")
    result = average_files(paths, args.output, ema=args.ema)
    print(json.dumps(result))
    return 0
