"""Train (or fine-tune) a MobileNetV3, on one CPU, one GPU, or many through torchrun.

Config layers: built-in defaults <- --recipe NAME <- --config FILE <- flags <- --set KEY=VALUE.
Every key of `mobilenetv3 train --list-keys` can be set with --set (e.g. --set schedule.name=step).

The data must be named: --data (a folder, fashion-mnist or synthetic), or a recipe / config / resumed run
that sets it.  Without a terminal (a log file, a pipe) there are no progress bars, one line per epoch.
--resume refuses settings that would break an exact resume (see --allow-config-change).

examples:
  mobilenetv3 train --recipe fashion-mnist --output runs/fm
  mobilenetv3 train --data /data/imagenet --recipe imagenet-timm --set ema.decay=0.9998 --output runs/in1k
  torchrun --nproc_per_node=8 -m mobilenetv3 train --data /data/imagenet --recipe imagenet-paper --output runs/paper
  mobilenetv3 train --output runs/fm --resume            # continue from runs/fm/checkpoints/last.pt
  mobilenetv3 train --output runs/fm --resume --epochs 20   # extend a finished run
  mobilenetv3 train --data synthetic --limit-train-batches 5 --epochs 1 --output /tmp/speed   # random tensors
  mobilenetv3 train --config runs/fm/config.yaml --pretrained runs/fm/checkpoints/best.pt --qat --epochs 2 --lr 1e-4 --output runs/fm-qat   # QAT: ends with checkpoints/int8.pte
"""

from __future__ import annotations

import argparse
import json
import os
import typing

from ..errors import UserError

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
    "qat": "qat.enabled",
    "device": "device",
}

#: `train` flags that `lr-find` does not take: it runs its own number of steps at its own learning rates,
#: with no schedule, validation, averaging or checkpoints.
TRAIN_ONLY_FLAGS = ("epochs", "lr", "sched", "compile", "sync-bn", "limit-train-batches", "limit-val-batches", "ema",
                    "ema-decay", "checkpoint-every-steps", "qat")

#: Help beyond the "[key]" of a flag.
FLAG_HELP = {
    "data": "what to train on: a folder in ImageNet layout (DIR/train/<class>/*, DIR/val/<class>/*), "
            "'fashion-mnist', or 'synthetic' (random tensors: speed tests only); required unless {sources} sets it",
    "qat": "quantization-aware training (default: off): fine-tune a fake-quantized int8 graph, start from "
           "--pretrained W with a small --lr; ends with checkpoints/int8.pte (needs 'mobilenetv3[mobile]')",
}

#: What a flag's default means, for its help, where the bare value would not say it.
DEFAULT_MEANS = {
    "data-dir": "$MOBILENETV3_DATA, /usr/share/datasets/fashion-mnist, then the cache",
    "input-size": "the data's: 224 for folders, 28 for fashion-mnist", "num-classes": "the data's",
    "pretrained": "none, random initialisation", "limit-train-batches": "all", "limit-val-batches": "all",
    "lr": "{default} for {lr_base_batch} images, scaled linearly with the global batch",
    "checkpoint-every-steps": "0, at epoch ends only",
}

DATA_REQUIRED = (
    "no training data given: use --data DIR (a folder in ImageNet layout: DIR/train/<class>/*, DIR/val/<class>/*), "
    "--data fashion-mnist, or --data synthetic (random tensors, for speed tests only), or a --recipe / --config "
    "that sets data.dataset"
)


def _field_type(dotted: str):
    from ..train.config import TrainConfig

    cls, hint = TrainConfig, None
    for part in dotted.split("."):
        hint = typing.get_type_hints(cls)[part]
        cls = hint
    return hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, data_sources="--recipe, --config or --resume")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="FILE",
                        help="continue a run: from OUTPUT/checkpoints/last.pt, or from FILE, with the config stored "
                             "in it; settings that break an exact resume are refused, --epochs may grow")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: continue although the config differs from the checkpoint's (input "
                             "size, lr, batch size, batch limits, ...); the resume is then not exact")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its value, and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, and exit")


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                         data_sources: str = "--recipe or --config") -> None:
    """--recipe, --config, the flag shortcuts of FLAGS (but `skip`), --set and --progress (train and lr-find);
    `data_sources`: what else can name the data, for --data's help."""
    from ..train.config import TrainConfig, flatten, list_recipes, to_dict

    parser.add_argument("--recipe", default=None, help=f"shipped recipe: {', '.join(list_recipes())}")
    parser.add_argument("--config", default=None, metavar="FILE", help="a YAML config (e.g. a run's config.yaml)")
    group = parser.add_argument_group("config shortcuts (each sets the key in brackets; the defaults are the "
                                      "built-in config's, which a recipe may change)")
    defaults = flatten(to_dict(TrainConfig()))
    for flag, key in FLAGS.items():
        if flag in skip:
            continue
        hint = _field_type(key)
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        base = options[0] if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) else hint
        if flag in FLAG_HELP:
            text = f"[{key}] {FLAG_HELP[flag].format(sources=data_sources)}"
        else:
            default = defaults[key]
            shown = DEFAULT_MEANS.get(flag, "").format(default=default, lr_base_batch=defaults["optim.lr_base_batch"]) or (
                ("on" if default else "off") if isinstance(default, bool) else default)
            text = f"[{key}] (default: {shown})".replace("%", "%%")
        if base is bool:
            group.add_argument(f"--{flag}", dest=key, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(base) is typing.Literal:
            group.add_argument(f"--{flag}", dest=key, choices=typing.get_args(base), default=None, help=text)
        else:
            group.add_argument(f"--{flag}", dest=key, default=None, metavar=key.rsplit(".", 1)[-1].upper(), help=text)
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. --set schedule.warmup_epochs=2 (repeatable)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bars (default: only when stderr is a terminal and TQDM_DISABLE is not "
                             "set; a log file gets one line per epoch instead)")


def resolve_config(args: argparse.Namespace):
    """The TrainConfig the command line describes (shared by `train` and `lr-find`).

    `--resume` without --recipe / --config starts from the config stored in the checkpoint it resumes
    (OUTPUT/checkpoints/last.pt, or FILE), so `train --output DIR --resume` just continues, exactly.  Not
    from config.yaml: after a resume with --allow-config-change that file holds the new settings before
    any checkpoint does, and a plain resume of the checkpoint would then be refused as a change.
    """
    from pathlib import Path

    from ..train.checkpoint import load
    from ..train.config import load_config, parse_assignment, read_yaml

    base = None
    resume = getattr(args, "resume", None)
    if resume is not None and args.recipe is None and args.config is None:
        if resume == "auto":
            run_folder = Path(getattr(args, "output", None) or "runs/train")
            saved, last = run_folder / "config.yaml", run_folder / "checkpoints" / "last.pt"
            # the config inside last.pt; config.yaml only for a run without one (the resume then fails, naming it)
            base = load(last)["config"] if last.is_file() else read_yaml(saved) if saved.is_file() else None
        else:
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


def require_data_source(args: argparse.Namespace) -> None:
    """A UserError unless a flag, --set, the recipe, the config file or a resumed run names the data: the
    built-in default (synthetic random tensors) is for speed tests, never what a user means by leaving it out."""
    from ..train.config import parse_assignment, read_yaml, recipe_path

    if getattr(args, "resume", None) is not None or getattr(args, "data.dataset", None) is not None:
        return
    if any(parse_assignment(text)[0] == "data.dataset" for text in args.assignments):
        return
    for path in (recipe_path(args.recipe) if args.recipe else None, args.config):
        data = read_yaml(path).get("data") if path else None
        if isinstance(data, dict) and data.get("dataset") is not None:
            return
    raise UserError(DATA_REQUIRED)


def run(args: argparse.Namespace) -> int:
    from ..train.config import all_keys, dump_yaml, flatten, to_dict

    config = resolve_config(args)
    if args.list_keys:
        flat = flatten(to_dict(config))
        for key in all_keys():
            print(f"{key} = {json.dumps(flat[key])}")
        return 0
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    require_data_source(args)
    if args.allow_config_change and args.resume is None:
        raise UserError("--allow-config-change applies to --resume only")
    from ..train import run as train_run

    summary = train_run(config, progress=args.progress, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per job, not per process
        keys = ("output", "epochs", "steps", "best_metric", "best_value", "best_epoch", "wall_time_s")
        print(json.dumps({key: summary[key] for key in keys}))
    return 0
