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
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..train import run as train_run
from ..train.checkpoint import load
from ..train.config import (
    DEFAULT_OUTPUT,
    all_keys,
    dump_yaml,
    flatten,
    key_info,
    list_recipes,
    load_config,
    parse_assignment,
    read_yaml,
    recipe_path,
    to_dict,
)

HELP = "train a model (recipes, resume, torchrun DDP)"


@dataclass(frozen=True)
class Shortcut:
    """A command-line flag that sets one config key; its kind (on/off, choices, value) and default come from
    the key's annotation and limits (`config.key_info`)."""

    flag: str
    key: str
    #: what the flag does, where "[key] (default: ...)" would not say it ({sources}: what else names the data).
    help: str = ""
    #: what the default means, where the bare value would not say it ({default}, {lr_base_batch}).
    default_means: str = ""
    #: `lr-find` does not take it: it runs its own number of steps at its own learning rates, with no
    #: schedule, validation, averaging or checkpoints.
    train_only: bool = False


SHORTCUTS = (
    Shortcut("data", "data.dataset",
             help="what to train on: a folder in ImageNet layout (DIR/train/<class>/*, DIR/val/<class>/*), "
                  "'fashion-mnist', or 'synthetic' (random tensors: speed tests only); required unless {sources} "
                  "sets it"),
    Shortcut("data-dir", "data.data_dir",
             default_means="$MOBILENETV3_DATA, /usr/share/datasets/fashion-mnist, then the cache"),
    Shortcut("input-size", "data.input_size", default_means="the data's: 224 for folders, 28 for fashion-mnist"),
    Shortcut("workers", "data.workers"),
    Shortcut("strict-data", "data.strict_data"),
    Shortcut("task", "task", default_means="auto: the data's (classification; segmentation for mask data such "
                                           "as fashion-mnist-seg; detection for box data such as "
                                           "fashion-mnist-det)"),
    Shortcut("model", "model.name"),
    Shortcut("num-classes", "model.num_classes", default_means="the data's"),
    Shortcut("pretrained", "model.pretrained", default_means="none, random initialisation"),
    Shortcut("output", "output"),
    Shortcut("epochs", "epochs", train_only=True),
    Shortcut("batch-size", "batch_size"),
    Shortcut("lr", "optim.lr", default_means="{default} for {lr_base_batch} images, scaled linearly with the global "
                                             "batch", train_only=True),
    Shortcut("opt", "optim.name"),
    Shortcut("sched", "schedule.name", train_only=True),
    Shortcut("amp", "amp"),
    Shortcut("channels-last", "channels_last"),
    Shortcut("compile", "compile", train_only=True),
    Shortcut("sync-bn", "sync_bn", train_only=True),
    Shortcut("deterministic", "deterministic"),
    Shortcut("seed", "seed"),
    Shortcut("limit-train-batches", "limit_train_batches", default_means="all", train_only=True),
    Shortcut("limit-val-batches", "limit_val_batches", default_means="all", train_only=True),
    Shortcut("ema", "ema.enabled", train_only=True),
    Shortcut("ema-decay", "ema.decay", train_only=True),
    Shortcut("checkpoint-every-steps", "checkpoint.every_steps", default_means="0, at epoch ends only",
             train_only=True),
    Shortcut("qat", "qat.enabled",
             help="quantization-aware training (default: off): fine-tune a fake-quantized int8 graph, start from "
                  "--pretrained W with a small --lr; ends with checkpoints/int8.pte (needs 'mobilenetv3[mobile]')",
             train_only=True),
    Shortcut("device", "device"),
)

#: `train` flags that `lr-find` does not take (`Shortcut.train_only`).
TRAIN_ONLY_FLAGS = tuple(shortcut.flag for shortcut in SHORTCUTS if shortcut.train_only)

DATA_REQUIRED = (
    "no training data given: use --data DIR (a folder in ImageNet layout: DIR/train/<class>/*, DIR/val/<class>/*), "
    "--data fashion-mnist, or --data synthetic (random tensors, for speed tests only), or a --recipe / --config "
    "that sets data.dataset"
)


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
    """--recipe, --config, the flags of SHORTCUTS (but `skip`), --set and --progress (train and lr-find);
    `data_sources`: what else can name the data, for --data's help."""
    parser.add_argument("--recipe", default=None, help=f"shipped recipe: {', '.join(list_recipes())}")
    parser.add_argument("--config", default=None, metavar="FILE", help="a YAML config (e.g. a run's config.yaml)")
    group = parser.add_argument_group("config shortcuts (each sets the key in brackets; the defaults are the "
                                      "built-in config's, which a recipe may change)")
    for shortcut in SHORTCUTS:
        if shortcut.flag not in skip:
            _add_shortcut(group, shortcut, data_sources)
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. --set schedule.warmup_epochs=2 (repeatable)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bars (default: only when stderr is a terminal and TQDM_DISABLE is not "
                             "set; a log file gets one line per epoch instead)")


def _add_shortcut(group: argparse._ArgumentGroup, shortcut: Shortcut, data_sources: str) -> None:
    """The one place a config key becomes a flag: on/off for a bool, the choices of a Literal, else a value
    (parsed and checked with the key's annotation and limits when the config is loaded, as --set's are)."""
    info = key_info(shortcut.key)
    if shortcut.help:
        text = f"[{shortcut.key}] {shortcut.help.format(sources=data_sources)}"
    else:
        shown = shortcut.default_means.format(default=info.default,
                                              lr_base_batch=key_info("optim.lr_base_batch").default)
        if not shown:
            shown = ("on" if info.default else "off") if info.kind is bool else info.default
        text = f"[{shortcut.key}] (default: {shown})".replace("%", "%%")
    flag, dest = f"--{shortcut.flag}", shortcut.key
    if info.kind is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif info.choices and all(isinstance(choice, str) for choice in info.choices):
        group.add_argument(flag, dest=dest, choices=info.choices, default=None, help=text)
    else:
        group.add_argument(flag, dest=dest, default=None, metavar=dest.rsplit(".", 1)[-1].upper(), help=text)


def resolve_config(args: argparse.Namespace):
    """The TrainConfig the command line describes (shared by `train` and `lr-find`).

    `--resume` without --recipe / --config starts from the config stored in the checkpoint it resumes
    (OUTPUT/checkpoints/last.pt, or FILE), so `train --output DIR --resume` just continues, exactly.  Not
    from config.yaml: after a resume with --allow-config-change that file holds the new settings before
    any checkpoint does, and a plain resume of the checkpoint would then be refused as a change.
    """
    base = None
    resume = getattr(args, "resume", None)
    if resume is not None and args.recipe is None and args.config is None:
        if resume == "auto":
            run_folder = Path(getattr(args, "output", None) or DEFAULT_OUTPUT)
            saved, last = run_folder / "config.yaml", run_folder / "checkpoints" / "last.pt"
            # the config inside last.pt; config.yaml only for a run without one (the resume then fails, naming it)
            base = load(last)["config"] if last.is_file() else read_yaml(saved) if saved.is_file() else None
        else:
            base = load(resume)["config"]

    overrides = []
    for shortcut in SHORTCUTS:
        value = getattr(args, shortcut.key, None)
        if value is not None:
            overrides.append((shortcut.key, value))
    if getattr(args, "resume", None) is not None:
        overrides.append(("resume", args.resume))
    overrides += [parse_assignment(text) for text in args.assignments]
    return load_config(args.recipe, args.config, overrides, base=base)


def require_data_source(args: argparse.Namespace) -> None:
    """A UserError unless a flag, --set, the recipe, the config file or a resumed run names the data: the
    built-in default (synthetic random tensors) is for speed tests, never what a user means by leaving it out."""
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
    summary = train_run(config, progress=args.progress, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per job, not per process
        keys = ("output", "epochs", "steps", "best_metric", "best_value", "best_epoch", "wall_time_s")
        print(json.dumps({key: summary[key] for key in keys}))
    return 0
