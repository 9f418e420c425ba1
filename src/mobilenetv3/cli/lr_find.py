"""LR range test: raise the learning rate exponentially over a few hundred steps, plot the loss,
and suggest a learning rate and a range (for cyclic / one-cycle schedules).

Takes the config options of `train` that shape a training step (recipe, --config, --set, data, model,
batch size, optimizer, precision); not the ones of a whole run (--resume, --epochs, --lr, schedule, EMA,
batch limits, checkpoints).  Writes OUTPUT/lr_find.png and OUTPUT/lr_find.json; the last line printed is
the JSON suggestion:

  steepest_lr       the lr where the smoothed loss falls fastest (a constant or peak lr)
  min_loss_lr       the lr of the lowest smoothed loss (beyond it, training is close to diverging)
  suggested_min_lr  the lower, and suggested_max_lr the upper end of the suggested range: steepest_lr and
                    min_loss_lr / 10, whichever is lower first (for cyclic / one-cycle schedules)
  optim_lr_equivalent  the same lrs as optim.lr (--lr) at optim.lr_base_batch, which train scales to its
                    global batch (the sweep itself ran at global batch `global_batch`)

example:
  mobilenetv3 lr-find --recipe fashion-mnist --output runs/lr --steps 100 --end-lr 1
"""

from __future__ import annotations

import argparse
import json

from ..errors import UserError

HELP = "learning-rate range test: plot and suggested range"

#: The keys of the printed JSON line (lr_find.json holds them too, with the whole curve).
JSON_KEYS = ("steepest_lr", "min_loss_lr", "suggested_min_lr", "suggested_max_lr", "optim_lr_equivalent",
             "global_batch", "plot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # cli.train imports torch: loaded when lr-find's parser is built, not by importing this module
    from .train import TRAIN_ONLY_FLAGS, add_config_arguments

    add_config_arguments(parser, skip=TRAIN_ONLY_FLAGS)
    parser.add_argument("--start-lr", type=float, default=1e-6, metavar="LR",
                        help="learning rate of the first step (default: %(default)g)")
    parser.add_argument("--end-lr", type=float, default=1.0, metavar="LR",
                        help="learning rate of the last step, reached unless the loss diverges first "
                             "(default: %(default)g)")
    parser.add_argument("--steps", type=int, default=100,
                        help="optimizer steps from --start-lr to --end-lr, growing exponentially "
                             "(default: %(default)d)")


def run(args: argparse.Namespace) -> int:
    from ..train.lr_find import lr_range_test  # torch on use only, as in add_arguments
    from .train import require_data_source, resolve_config

    config = resolve_config(args)
    require_data_source(args)
    if config.qat.enabled:  # e.g. a QAT run's config.yaml: say so rather than measure another network
        raise UserError("lr-find measures the float network, not a quantization-aware training graph: run it "
                        "with --set qat.enabled=false (the float network's range is a fair start for QAT's lr)")
    result = lr_range_test(config, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, output=config.output,
                           progress=args.progress)
    print(f"lr-find: steepest descent at lr {result['steepest_lr']:.3g}, lowest loss at {result['min_loss_lr']:.3g}; "
          f"suggested range {result['suggested_min_lr']:.3g} .. {result['suggested_max_lr']:.3g} "
          f"(global batch {result['global_batch']}; plot {result['plot']})")
    print(json.dumps({key: result[key] for key in JSON_KEYS}))
    return 0
