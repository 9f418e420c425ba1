"""The training configuration: typed dataclasses, YAML recipes, command-line overrides, validation.

A run is described by one `TrainConfig`.  It is built in layers, each overriding the previous one:

1. the dataclass defaults (the built-in general-purpose recipe),
2. a shipped recipe (`--recipe fashion-mnist`, a YAML file in `mobilenetv3/recipes/`) or any YAML file (`--config`),
3. dotted overrides (`--set optim.lr=0.1`, or the flat flags such as `--lr 0.1` that map onto them).

Every key of every section can be set in all three places.  Unknown keys are errors naming the key and
its closest matches; values are converted to the field's type and validated, and mistakes are `UserError`s.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data.config import DataConfig
from ..errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

OptimizerName = Literal["sgd", "rmsproptf", "rmsprop", "adamw"]
ScheduleName = Literal["cosine", "step", "multistep", "exponential", "cyclic", "onecycle", "constant"]
CyclicMode = Literal["triangular", "triangular2", "exp_range"]
AmpMode = Literal["none", "bf16", "fp16"]


@dataclass
class ModelConfig:
    #: a registered name (`mobilenetv3 list`).
    name: str = "mobilenetv3_large_100"
    #: None: the dataset's class count.
    num_classes: int | None = None
    #: None: what the dataset implies (1 for Fashion-MNIST), else 3.
    in_chans: int | None = None
    #: None: what the dataset implies (1 for 28x28 Fashion-MNIST), else the paper's 2.
    stem_stride: int | None = None
    #: None: the architecture's 32.  16 or 8 turn the strides past it into dilation, keeping later feature
    #: maps larger (for small images: 28x28 with stem stride 1 ends at 4x4 with 8 instead of 2x2).
    output_stride: int | None = None
    #: None: the registered name's width (only needed for the generic builders, e.g. "mobilenetv3_large").
    width_mult: float | None = None
    drop_rate: float = 0.2
    #: stochastic depth of the last block, linearly scaled from 0 at the first (torchvision.ops.StochasticDepth).
    drop_path_rate: float = 0.0
    #: start each residual block's last BN at zero scale, so every block begins as the identity.
    zero_init_last: bool = False
    bn_eps: float | None = None
    #: PyTorch's and timm's 0.1: BN statistics that follow the weights within a short run.  The TF reference's
    #: 0.01 (decay 0.99) suits long ImageNet runs (`imagenet-paper` and `imagenet-torchvision` set it); None:
    #: the constructor's 0.01.
    bn_momentum: float | None = 0.1
    #: a weights file or checkpoint to start from; the classifier is replaced when the class count differs.
    pretrained: str | None = None


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"
    #: the learning rate at `lr_base_batch` images per optimizer step (scaled linearly with the global batch).
    lr: float = 2e-3
    #: None: `lr` is used as is, whatever the global batch.
    lr_base_batch: int | None = 256
    weight_decay: float = 0.05
    #: BatchNorm weights and all biases get no weight decay (as the paper's TF code and timm do).
    no_decay_norm_and_bias: bool = True
    momentum: float = 0.9
    nesterov: bool = True
    #: RMSProp's squared-gradient decay ("rho" in TF, "alpha" in torch).
    alpha: float = 0.9
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    #: clip the global gradient norm to this value; None: no clipping.
    grad_clip_norm: float | None = None
    #: micro-batches per optimizer step (the global batch grows by this factor).
    accumulation_steps: int = 1


@dataclass
class ScheduleConfig:
    name: ScheduleName = "cosine"
    #: linear warmup from `warmup_start_factor * lr` (fractional epochs allowed).
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 0.01
    #: floor of cosine / cyclic / one-cycle (absolute, not scaled with the batch).
    min_lr: float = 0.0
    #: step: lr * gamma ** floor(epoch / step_epochs), once per epoch (torchvision, timm).
    #: exponential: lr * gamma ** (step / (step_epochs * steps_per_epoch)), floored when `staircase` (TF-slim).
    step_epochs: float = 30.0
    gamma: float = 0.1
    staircase: bool = True
    #: multistep: epochs at which lr is multiplied by gamma.
    milestones: list[float] = field(default_factory=list)
    #: cyclic: one full cycle (up and down) in epochs; triangular2 halves the amplitude each cycle,
    #: exp_range multiplies it by cyclic_gamma ** step.
    cycle_epochs: float = 4.0
    cyclic_mode: CyclicMode = "triangular"
    cyclic_gamma: float = 0.99999
    #: one-cycle (torch OneCycleLR's cosine form): fraction of steps going up, start = lr / div_factor,
    #: end = start / final_div_factor.
    pct_start: float = 0.25
    div_factor: float = 25.0
    final_div_factor: float = 1e4


@dataclass
class RegularizationConfig:
    label_smoothing: float = 0.1
    #: Beta(alpha, alpha) of mixup / cutmix (torchvision.transforms.v2.MixUp / CutMix); 0 disables each.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    #: switch mixup / cutmix off for the last N epochs (clean fine-tuning at the end).
    mix_off_last_epochs: int = 0
    #: DropBlock (torchvision.ops.DropBlock2d) after the blocks of the last two resolutions; its drop
    #: probability ramps linearly from 0 to this value over the whole training.
    dropblock_prob: float = 0.0
    dropblock_size: int = 3
    #: None: the blocks of the last two resolutions; else block indices.
    dropblock_blocks: list[int] | None = None


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999
    #: decay_t = min(decay, (1 + t) / (10 + t)) so that short runs get a useful average (timm's warmup).
    warmup: bool = True
    every_steps: int = 1


@dataclass
class SWAConfig:
    """Stochastic weight averaging (Izmailov et al. 2018, with torch.optim.swa_utils).

    After `start_epoch` epochs of the normal schedule (which keeps its full length, as in torch's SWA
    example) the lr anneals (SWALR's cosine, over `anneal_epochs`) to `lr_ratio` x the batch-scaled base lr
    and stays there; the weights at the end of every later epoch are averaged uniformly.  The average's
    BatchNorm statistics are recomputed on training batches (`update_bn`; `bn_batches` per process, 0 = a
    whole epoch) before it is validated and saved.
    """

    enabled: bool = False
    #: 0: average the last quarter of the epochs (start after round(0.75 * epochs)).
    start_epoch: int = 0
    lr_ratio: float = 0.1
    anneal_epochs: float = 1.0
    bn_batches: int = 0

    def first_epoch_after(self, epochs: int) -> int:
        """The epochs of the normal schedule before averaging starts."""
        return self.start_epoch or round(0.75 * epochs)


@dataclass
class CheckpointConfig:
    #: also write checkpoints/last.pt every N optimizer steps (0: only at the end of each epoch).
    every_steps: int = 0
    #: the metric `best.pt` follows: val_top1, ema_val_top1, val_loss or ema_val_loss (an SWA run's
    #: result is checkpoints/swa.safetensors, the final average).
    best_metric: str = "val_top1"
    #: keep weights-only checkpoints/epoch_NNNN.pt of the last K epochs (for `mobilenetv3 average --last K`).
    keep_last_epochs: int = 0
    #: and of the K best epochs by `best_metric` (for `mobilenetv3 average --best K`).
    keep_best_epochs: int = 0


@dataclass
class QATConfig:
    """Quantization-aware training: fine-tune a fake-quantized graph of the network (PT2E `prepare_qat_pt2e`
    with XNNPACK's int8 scheme, `deploy.quantize.prepare_qat`), for when post-training quantization
    (`mobilenetv3 quantize`) loses too much.  Start it from trained weights (model.pretrained) with a small lr.
    The run's checkpoints hold the graph's state (`mobilenetv3 quantize --checkpoint` converts any of them);
    at the end checkpoints/int8.pte is written, verified against the graph.  Not combined with EMA, SWA,
    DropBlock, stochastic depth, AMP, SyncBN or torch.compile (they act on the network's modules, which the
    graph replaces).
    """

    enabled: bool = False
    #: stop updating the quantization ranges (activations', and the weights' per-channel ones) after this many
    #: epochs (0: never); the weights keep training against them, as torchvision's QAT recipe does after 4 epochs.
    freeze_observers_epoch: int = 0
    #: the fixed batch size of checkpoints/int8.pte (>= 1; larger inputs are run in chunks).
    pte_batch: int = 1


@dataclass
class TrainConfig:
    description: str = "built-in default: AdamW, cosine with 1 warmup epoch, label smoothing 0.1"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(workers=2))
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    epochs: int = 10
    #: per process (per GPU); the global batch is batch_size * world_size * accumulation_steps.
    batch_size: int = 64
    seed: int = 0
    #: torch.use_deterministic_algorithms; with it a run is bit-for-bit repeatable (and resumable) on CPU.
    deterministic: bool = False
    amp: AmpMode = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    #: "auto": cuda when available, else cpu.
    device: str = "auto"
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    output: str = "runs/train"
    #: a checkpoint to resume from ("auto": OUTPUT/checkpoints/last.pt).
    resume: str | None = None
    #: the paper's (or the recipe source's) claimed top-1, drawn on curves.png.
    reference_top1: float | None = None
    reference_label: str | None = None
    #: intra-op threads per process on CPU (0: torch's default).
    threads: int = 0
    #: on CPU with glibc: keep freed memory in the process, so steps stop page-faulting (mobilenetv3/allocator.py).
    keep_freed_memory: bool = True


SECTIONS = ("model", "data", "optim", "schedule", "regularization", "ema", "swa", "checkpoint", "qat")


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass, with type conversion and strict keys


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config, e.g. "optim.lr"."""
    keys = []
    for f in fields(cls):
        hint = _hints(cls)[f.name]
        if is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str) -> UserError:
    keys = all_keys()
    section, _, tail = key.rpartition(".")
    # First the same section ("optim.lrr" -> "optim.lr"), then any section with that exact name
    # ("lr" -> "optim.lr"), then anything close.
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == section]
    close = [f"{section}.{name}" if section else name
             for name in difflib.get_close_matches(tail, siblings, n=3, cutoff=0.6)]
    if not close:
        close = [k for k in keys if k.rpartition(".")[2] == tail] or difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown config key {key!r}{hint}")


def _convert(value: Any, hint: Any, key: str) -> Any:
    """`value` (from YAML or the command line) as the type `hint`, or a UserError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, key)
            except UserError as error:
                errors.append(str(error))
        raise UserError(errors[0])
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(f"[{value}]") if not value.startswith("[") else yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise UserError(f"{key} must have {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, key) for v, a in zip(value, args))
        return [_convert(v, args[0], key) for v in value]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string, from the command line and from files alike.
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {value!r}")
        if hint is int:
            if float(value) != int(value):
                raise UserError(f"{key} must be an integer, got {value!r}")
            return int(value)
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(data: dict[str, Any], cls: type = TrainConfig, prefix: str = "", base: Any = None) -> Any:
    """A `cls` instance from nested dict `data`, starting from `base` (or the defaults)."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    instance = base if base is not None else cls()
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(dotted)
        hint = hints[key]
        if is_dataclass(hint):
            setattr(instance, key, from_dict(value, hint, f"{dotted}.", getattr(instance, key)))
        else:
            setattr(instance, key, _convert(value, hint, dotted))
    return instance


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples), as written to config.yaml and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(asdict(config))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (`to_dict`, or a checkpoint's stored config) as {"optim.lr": 0.002, ...}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_key(config: TrainConfig, dotted: str, value: Any) -> None:
    """Set one dotted key (e.g. "optim.lr") from a YAML-ish string or a value."""
    parts = dotted.split(".")
    nested: dict[str, Any] = {}
    cursor = nested
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    # A string (from the command line) is converted by the field's type in _convert: "0.1" -> 0.1,
    # "true" -> True, "none" -> None for optional fields, "[30, 60]" or "30,60" -> a list.
    cursor[parts[-1]] = value
    from_dict(nested, base=config)


def parse_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE (e.g. optim.lr=0.1), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


# ---------------------------------------------------------------------------------------------------------
# recipes


def list_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, list_recipes(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown recipe {name!r} (shipped: {', '.join(list_recipes())}){hint}")
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    # config.yaml of a run folder carries provenance next to the config; it is not part of it.
    data.pop("provenance", None)
    return data


def load_config(
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[tuple[str, Any]] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults <- base (e.g. a checkpoint's config) <- recipe <- config file <- overrides, then `validate`."""
    config = TrainConfig()
    if base:
        from_dict(base, base=config)
    if recipe:
        from_dict(read_yaml(recipe_path(recipe)), base=config)
    if config_file:
        from_dict(read_yaml(config_file), base=config)
    for key, value in overrides or []:
        set_key(config, key, value)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Value checks that types alone cannot express; each error names the key."""
    from ..data.build import check_data_config

    def positive(key: str, value: float | None, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise UserError(f"{key} must be positive, got {value}")

    def in_range(key: str, value: float, low: float, high: float) -> None:
        if not low <= value <= high:
            raise UserError(f"{key} must be in [{low}, {high}], got {value}")

    positive("epochs", config.epochs)
    positive("batch_size", config.batch_size)
    positive("optim.lr", config.optim.lr)
    positive("optim.lr_base_batch", config.optim.lr_base_batch, allow_none=True)
    positive("optim.accumulation_steps", config.optim.accumulation_steps)
    positive("optim.grad_clip_norm", config.optim.grad_clip_norm, allow_none=True)
    positive("optim.eps", config.optim.eps)
    positive("limit_train_batches", config.limit_train_batches, allow_none=True)
    positive("limit_val_batches", config.limit_val_batches, allow_none=True)
    positive("ema.every_steps", config.ema.every_steps)
    positive("schedule.step_epochs", config.schedule.step_epochs)
    positive("schedule.cycle_epochs", config.schedule.cycle_epochs)
    positive("schedule.div_factor", config.schedule.div_factor)
    positive("schedule.final_div_factor", config.schedule.final_div_factor)
    positive("regularization.dropblock_size", config.regularization.dropblock_size)
    if config.regularization.dropblock_size % 2 == 0:
        raise UserError(f"regularization.dropblock_size must be odd, got {config.regularization.dropblock_size}")
    if config.optim.weight_decay < 0:
        raise UserError(f"optim.weight_decay must be >= 0, got {config.optim.weight_decay}")
    in_range("optim.momentum", config.optim.momentum, 0.0, 1.0)
    in_range("optim.alpha", config.optim.alpha, 0.0, 1.0)
    in_range("schedule.gamma", config.schedule.gamma, 0.0, 1.0)
    in_range("schedule.pct_start", config.schedule.pct_start, 0.0, 1.0)
    in_range("schedule.warmup_start_factor", config.schedule.warmup_start_factor, 0.0, 1.0)
    if config.schedule.warmup_epochs < 0 or config.schedule.min_lr < 0:
        raise UserError("schedule.warmup_epochs and schedule.min_lr must be >= 0")
    if config.schedule.warmup_epochs > config.epochs and config.schedule.name not in ("onecycle", "cyclic"):
        raise UserError(
            f"schedule.warmup_epochs ({config.schedule.warmup_epochs}) is longer than the run (epochs={config.epochs})"
        )
    if sorted(config.schedule.milestones) != list(config.schedule.milestones):
        raise UserError(f"schedule.milestones must be increasing, got {config.schedule.milestones}")
    in_range("regularization.label_smoothing", config.regularization.label_smoothing, 0.0, 1.0)
    in_range("regularization.dropblock_prob", config.regularization.dropblock_prob, 0.0, 1.0)
    for key in ("mixup_alpha", "cutmix_alpha", "mix_off_last_epochs"):
        if getattr(config.regularization, key) < 0:
            raise UserError(f"regularization.{key} must be >= 0, got {getattr(config.regularization, key)}")
    in_range("ema.decay", config.ema.decay, 0.0, 1.0)
    in_range("model.drop_rate", config.model.drop_rate, 0.0, 0.99)
    in_range("model.drop_path_rate", config.model.drop_path_rate, 0.0, 0.99)
    positive("model.num_classes", config.model.num_classes, allow_none=True)
    if config.model.output_stride not in (None, 8, 16, 32):
        raise UserError(f"model.output_stride must be 8, 16 or 32, got {config.model.output_stride}")
    if config.checkpoint.best_metric not in BEST_METRICS:
        raise UserError(
            f"checkpoint.best_metric must be one of {', '.join(BEST_METRICS)}, got {config.checkpoint.best_metric!r}"
        )
    if config.checkpoint.best_metric.startswith("ema_") and not config.ema.enabled:
        raise UserError(f"checkpoint.best_metric={config.checkpoint.best_metric} needs ema.enabled=true")
    if config.swa.enabled and not 1 <= config.swa.first_epoch_after(config.epochs) < config.epochs:
        raise UserError(f"swa.start_epoch ({config.swa.first_epoch_after(config.epochs)}) must be at least 1 and "
                        f"below epochs ({config.epochs}), so that training starts before averaging and some "
                        "epochs are averaged")
    if config.swa.start_epoch < 0:
        raise UserError(f"swa.start_epoch must be >= 0, got {config.swa.start_epoch}")
    positive("swa.lr_ratio", config.swa.lr_ratio)
    if config.swa.anneal_epochs < 0 or config.swa.bn_batches < 0:
        raise UserError("swa.anneal_epochs and swa.bn_batches must be >= 0")
    for key in ("every_steps", "keep_last_epochs", "keep_best_epochs"):
        if getattr(config.checkpoint, key) < 0:
            raise UserError(f"checkpoint.{key} must be >= 0, got {getattr(config.checkpoint, key)}")
    if config.threads < 0:
        raise UserError(f"threads must be >= 0, got {config.threads}")
    positive("qat.pte_batch", config.qat.pte_batch)
    if config.qat.freeze_observers_epoch < 0:
        raise UserError(f"qat.freeze_observers_epoch must be >= 0, got {config.qat.freeze_observers_epoch}")
    if config.qat.enabled:
        # Each acts on the network's modules (copies, hooks, module swaps, autocast regions), which the
        # fake-quantized graph replaces.
        refused = {"ema.enabled": config.ema.enabled, "swa.enabled": config.swa.enabled,
                   "regularization.dropblock_prob": config.regularization.dropblock_prob > 0,
                   # stochastic depth branches in Python on the training flag: export would freeze one draw
                   "model.drop_path_rate": config.model.drop_path_rate > 0,
                   "amp": config.amp != "none", "sync_bn": config.sync_bn, "compile": config.compile}
        values = flatten(to_dict(config))
        clashes = [f"{key}={values[key]}" for key, on in refused.items() if on]
        if clashes:
            raise UserError(f"qat.enabled (--qat) does not work with {', '.join(clashes)}: quantization-aware "
                            "training runs a fake-quantized graph, not the network's modules; turn "
                            f"{'it' if len(clashes) == 1 else 'them'} off")
    from ..models.registry import get_entry

    get_entry(config.model.name)  # an unknown model is an error now, not after the data is loaded
    check_data_config(config.data)


#: metric -> True when larger is better.
BEST_METRICS = {"val_top1": True, "ema_val_top1": True, "val_loss": False, "ema_val_loss": False}


def dump_yaml(config: TrainConfig, provenance: dict[str, Any] | None = None) -> str:
    data = to_dict(config)
    if provenance:
        data["provenance"] = provenance
    return yaml.safe_dump(data, sort_keys=False)


def replace_config(config: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(config, **changes)
