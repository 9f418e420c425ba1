"""Train (or fine-tune) a MobileNetV3, on one CPU, one GPU, or many through torchrun.

Config layers: built-in defaults <- --recipe NAME <- --config FILE <- flags <- --set KEY=VALUE.
Every key of `mobilenetv3 train --list-keys` can be set with --set (e.g. --set schedule.name=step).

examples:
  mobilenetv3 train --recipe fashion-mnist --output runs/fm
  mobilenetv3 train --data /data/imagenet --recipe imagenet-timm --set ema.decay=0.9998 --output runs/in1k
  torchrun --nproc_per_node=8 -m mobilenetv3 train --data /data/imagenet --recipe imagenet-paper --output runs/paper
  mobilenetv3 train --output runs/fm --resume            # continue from runs/fm/checkpoints/last.pt
"""

from __future__ import annotations

import argparse
import json
import os
import typing

HELP = "train a model (recipes, resume, torchrun DDP)"

#: command-line flag -> config key; the flag's type, choices and help come from the config dataclasses.
FLAGS: dict[str, str] = {
    "data": "data.dataset",
    "data-dir": "data.data_dir",
    "input-size": "data.input_size",
    "workers": "data.workers",
    "strict-data": "data.strict_data",
    "model": "model.name",
    "num-classes": "model.num_classes",
    "pretrained": "model.pretrained",
    "output": "output",
    "epochs": "epochs",
    "batch-size": "batch_size",
    "lr": "optim.lr",
    "opt": "optim.name",
    "sched": "schedule.name",
    "amp": "amp",
    "channels-last": "channels_last",
    "compile": "compile",
    "sync-bn": "sync_bn",
    "deterministic": "deterministic",
    "seed": "seed",
    "limit-train-batches": "limit_train_batches",
    "limit-val-batches": "limit_val_batches",
    "ema": "ema.enabled",
    "ema-decay": "ema.decay",
    "checkpoint-every-steps": "checkpoint.every_steps",
    "device": "device",
}


def _field_type(dotted: str):
    from ..train.config import TrainConfig

    cls, hint = TrainConfig, None
    for part in dotted.split("."):
        hint = typing.get_type_hints(cls)[part]
        cls = hint
    return hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.config import list_recipes

    parser.add_argument("--recipe", default=None, help=f"shipped recipe: {', '.join(list_recipes())}")
    parser.add_argument("--config", default=None, metavar="FILE", help="a YAML config (e.g. a run's config.yaml)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="FILE",
                        help="continue a run: from OUTPUT/checkpoints/last.pt, or from FILE")
    group = parser.add_argument_group("config shortcuts (each sets the key in brackets)")
    for flag, key in FLAGS.items():
        hint = _field_type(key)
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        base = options[0] if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) else hint
        if base is bool:
            group.add_argument(f"--{flag}", dest=key, action=argparse.BooleanOptionalAction, default=None,
                               help=f"[{key}]")
        elif typing.get_origin(base) is typing.Literal:
            group.add_argument(f"--{flag}", dest=key, choices=typing.get_args(base), default=None, help=f"[{key}]")
        else:
            group.add_argument(f"--{flag}", dest=key, default=None, metavar=key.rsplit(".", 1)[-1].upper(),
                               help=f"[{key}]")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. --set schedule.warmup_epochs=2 (repeatable)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its value, and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, and exit")


def resolve_config(args: argparse.Namespace):
    """The TrainConfig the command line describes (shared by `train` and `lr-find`).

    `--resume` without --recipe / --config starts from the run's own config (OUTPUT/config.yaml, or the
    config stored in the checkpoint FILE), so `train --output DIR --resume` just continues.
    """
    from pathlib import Path

    from ..train.config import load_config, parse_assignment, read_yaml

    base = None
    resume = getattr(args, "resume", None)
    if resume is not None and args.recipe is None and args.config is None:
        if resume == "auto":
            saved = Path(getattr(args, "output", None) or "runs/train") / "config.yaml"
            base = read_yaml(saved) if saved.is_file() else None
        else:
            from ..train.checkpoint import load

            base = load(resume)["config"]

    overrides = []
    for key in FLAGS.values():
        value = getattr(args, key, None)
        if value is not None:
            overrides.append((key, value))
    if getattr(args, "resume", None) is not None:
        overrides.append(("resume", args.resume))
    overrides += [parse_assignment(text) for text in args.assignments]
    return load_config(args.recipe, args.config, overrides, base=base)


def run(args: argparse.Namespace) -> int:
    from ..train.config import all_keys, dump_yaml, to_dict

    config = resolve_config(args)
    if args.list_keys:
        flat = to_dict(config)
        for key in all_keys():
            value = flat
            for part in key.split("."):
                value = value[part]
            print(f"{key} = {json.dumps(value)}")
        return 0
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    from ..train import run as train_run

    summary = train_run(config)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per job, not per process
        keys = ("output", "epochs", "steps", "best_metric", "best_value", "best_epoch", "wall_time_s")
        print(json.dumps({key: summary[key] for key in keys}))
    return 0
