"""LR range test: raise the learning rate exponentially over a few hundred steps, plot the loss,
and suggest a learning rate and a range (for cyclic / one-cycle schedules).

Takes the same config options as `train` (recipe, --set, data, model).  Writes OUTPUT/lr_find.png and
OUTPUT/lr_find.json; the last line printed is the JSON suggestion.

example:
  mobilenetv3 lr-find --recipe fashion-mnist --output runs/lr --steps 100 --end-lr 1
"""

from __future__ import annotations

import argparse
import json

HELP = "learning-rate range test: plot and suggested range"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import add_arguments as add_train_arguments

    add_train_arguments(parser)
    parser.add_argument("--start-lr", type=float, default=1e-6)
    parser.add_argument("--end-lr", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=100)


def run(args: argparse.Namespace) -> int:
    from ..train.lr_find import lr_range_test
    from .train import resolve_config

    config = resolve_config(args)
    result = lr_range_test(config, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, output=config.output)
    print(f"lr-find: steepest descent at lr {result['steepest']:.3g}, lowest loss at {result['min_loss']:.3g}; "
          f"suggested range {result['range'][0]:.3g} .. {result['range'][1]:.3g} "
          f"(global batch {result['global_batch']}; plot {result['plot']})")
    print(json.dumps({key: result[key] for key in ("steepest", "min_loss", "max", "range", "optim_lr_equivalent", "plot")}))
    return 0
