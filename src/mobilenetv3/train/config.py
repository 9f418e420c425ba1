"""The training configuration: typed dataclasses, YAML recipes, command-line overrides, validation.

A run is described by one `TrainConfig`.  It is built in layers, each overriding the previous one:

1. the dataclass defaults (the built-in general-purpose recipe),
2. a shipped recipe (`--recipe fashion-mnist`, a YAML file in `mobilenetv3/recipes/`) or any YAML file (`--config`),
3. dotted overrides (`--set optim.lr=0.1`, or the flat flags such as `--lr 0.1` that map onto them).

Every key of every section can be set in all three places.  Unknown keys are errors naming the key and
its closest matches.  A value is parsed by its field's annotation (`parse_value`), and checked against the
limits declared beside the field (`setting(default, gt=0)`, read by `check_limits`); `validate` adds the
checks that relate several fields.  Every mistake is a one-line `UserError` naming the key, the value and
the limit.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data.build import check_data_config
from ..data.config import DataConfig
from ..errors import UserError
from ..models.registry import get_entry

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
#: Where a run writes when no --output / `output` is given.
DEFAULT_OUTPUT = "runs/train"

OptimizerName = Literal["sgd", "rmsproptf", "rmsprop", "adamw"]
ScheduleName = Literal["cosine", "step", "multistep", "exponential", "cyclic", "onecycle", "constant"]
CyclicMode = Literal["triangular", "triangular2", "exp_range"]
AmpMode = Literal["none", "bf16", "fp16"]

#: The metrics `checkpoint.best_metric` can follow -> True when larger is better.
#: ("auto": the task's own: val_top1 for classification, val_miou for segmentation, val_map for detection;
#: see `train/tasks.py`)
BEST_METRICS = {"val_top1": True, "ema_val_top1": True, "val_loss": False, "ema_val_loss": False,
                "val_miou": True, "ema_val_miou": True, "val_pixel_acc": True, "ema_val_pixel_acc": True,
                "val_map": True, "ema_val_map": True, "val_map_50": True, "ema_val_map_50": True}
TaskName = Literal["auto", "classification", "segmentation", "detection"]


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, gt: float | None = None,
            ge: float | None = None, le: float | None = None, choices: tuple[Any, ...] | None = None,
            odd: bool = False, increasing: bool = False) -> Any:
    """A dataclass field with its limits beside it, in `metadata`, which `check_limits` enforces (None passes):
    `gt` / `ge` / `le` bounds, `choices`, `odd` (an odd integer), `increasing` (a sorted list)."""
    limits = {"gt": gt, "ge": ge, "le": le, "choices": choices, "odd": odd or None, "increasing": increasing or None}
    return field(default=default, default_factory=default_factory,
                 metadata={name: value for name, value in limits.items() if value is not None})


@dataclass
class ModelConfig:
    #: a registered name (`mobilenetv3 list`).
    name: str = "mobilenetv3_large_100"
    #: None: the dataset's class count.
    num_classes: int | None = setting(None, gt=0)
    #: None: what the dataset implies (1 for Fashion-MNIST), else 3.
    in_chans: int | None = None
    #: None: what the dataset implies (1 for 28x28 Fashion-MNIST), else the paper's 2.
    stem_stride: int | None = None
    #: None: the architecture's 32.  16 or 8 turn the strides past it into dilation, keeping later feature
    #: maps larger (for small images: 28x28 with stem stride 1 ends at 4x4 with 8 instead of 2x2).
    output_stride: int | None = setting(None, choices=(8, 16, 32))
    #: None: the registered name's width (only needed for the generic builders, e.g. "mobilenetv3_large").
    width_mult: float | None = None
    #: segmentation models: None (LR-ASPP) or "conv1x1", the plain 1x1-conv head on the same backbone.
    head: str | None = setting(None, choices=("lraspp", "conv1x1"))
    drop_rate: float = setting(0.2, ge=0.0, le=0.99)
    #: stochastic depth of the last block, linearly scaled from 0 at the first (torchvision.ops.StochasticDepth).
    drop_path_rate: float = setting(0.0, ge=0.0, le=0.99)
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
    lr: float = setting(2e-3, gt=0)
    #: None: `lr` is used as is, whatever the global batch.
    lr_base_batch: int | None = setting(256, gt=0)
    weight_decay: float = setting(0.05, ge=0)
    #: BatchNorm weights and all biases get no weight decay (as the paper's TF code and timm do).
    no_decay_norm_and_bias: bool = True
    momentum: float = setting(0.9, ge=0.0, le=1.0)
    nesterov: bool = True
    #: RMSProp's squared-gradient decay ("rho" in TF, "alpha" in torch).
    alpha: float = setting(0.9, ge=0.0, le=1.0)
    eps: float = setting(1e-8, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    #: clip the global gradient norm to this value; None: no clipping.
    grad_clip_norm: float | None = setting(None, gt=0)
    #: micro-batches per optimizer step (the global batch grows by this factor).
    accumulation_steps: int = setting(1, gt=0)


@dataclass
class ScheduleConfig:
    name: ScheduleName = "cosine"
    #: linear warmup from `warmup_start_factor * lr` (fractional epochs allowed).
    warmup_epochs: float = setting(1.0, ge=0)
    warmup_start_factor: float = setting(0.01, ge=0.0, le=1.0)
    #: floor of cosine / cyclic / one-cycle (absolute, not scaled with the batch).
    min_lr: float = setting(0.0, ge=0)
    #: step: lr * gamma ** floor(epoch / step_epochs), once per epoch (torchvision, timm).
    #: exponential: lr * gamma ** (step / (step_epochs * steps_per_epoch)), floored when `staircase` (TF-slim).
    step_epochs: float = setting(30.0, gt=0)
    gamma: float = setting(0.1, ge=0.0, le=1.0)
    staircase: bool = True
    #: multistep: epochs at which lr is multiplied by gamma.
    milestones: list[float] = setting(default_factory=list, increasing=True)
    #: cyclic: one full cycle (up and down) in epochs; triangular2 halves the amplitude each cycle,
    #: exp_range multiplies it by cyclic_gamma ** step.
    cycle_epochs: float = setting(4.0, gt=0)
    cyclic_mode: CyclicMode = "triangular"
    cyclic_gamma: float = 0.99999
    #: one-cycle (torch OneCycleLR's cosine form): fraction of steps going up, start = lr / div_factor,
    #: end = start / final_div_factor.
    pct_start: float = setting(0.25, ge=0.0, le=1.0)
    div_factor: float = setting(25.0, gt=0)
    final_div_factor: float = setting(1e4, gt=0)


@dataclass
class RegularizationConfig:
    label_smoothing: float = setting(0.1, ge=0.0, le=1.0)
    #: Beta(alpha, alpha) of mixup / cutmix (torchvision.transforms.v2.MixUp / CutMix); 0 disables each.
    mixup_alpha: float = setting(0.0, ge=0)
    cutmix_alpha: float = setting(0.0, ge=0)
    #: switch mixup / cutmix off for the last N epochs (clean fine-tuning at the end).
    mix_off_last_epochs: int = setting(0, ge=0)
    #: DropBlock (torchvision.ops.DropBlock2d) after the blocks of the last two resolutions; its drop
    #: probability ramps linearly from 0 to this value over the whole training.
    dropblock_prob: float = setting(0.0, ge=0.0, le=1.0)
    dropblock_size: int = setting(3, gt=0, odd=True)
    #: None: the blocks of the last two resolutions; else block indices.
    dropblock_blocks: list[int] | None = None


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = setting(0.9999, ge=0.0, le=1.0)
    #: decay_t = min(decay, (1 + t) / (10 + t)) so that short runs get a useful average (timm's warmup).
    warmup: bool = True
    every_steps: int = setting(1, gt=0)


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
    start_epoch: int = setting(0, ge=0)
    lr_ratio: float = setting(0.1, gt=0)
    anneal_epochs: float = setting(1.0, ge=0)
    bn_batches: int = setting(0, ge=0)

    def first_epoch_after(self, epochs: int) -> int:
        """The epochs of the normal schedule before averaging starts."""
        return self.start_epoch or round(0.75 * epochs)


@dataclass
class CheckpointConfig:
    #: also write checkpoints/last.pt every N optimizer steps (0: only at the end of each epoch).
    every_steps: int = setting(0, ge=0)
    #: the metric `best.pt` follows: val_top1, ema_val_top1, val_loss or ema_val_loss (an SWA run's
    #: result is checkpoints/swa.safetensors, the final average).
    best_metric: str = setting("auto", choices=(*BEST_METRICS, "auto"))
    #: keep weights-only checkpoints/epoch_NNNN.pt of the last K epochs (for `mobilenetv3 average --last K`).
    keep_last_epochs: int = setting(0, ge=0)
    #: and of the K best epochs by `best_metric` (for `mobilenetv3 average --best K`).
    keep_best_epochs: int = setting(0, ge=0)


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
    freeze_observers_epoch: int = setting(0, ge=0)
    #: the fixed batch size of checkpoints/int8.pte (>= 1; larger inputs are run in chunks).
    pte_batch: int = setting(1, gt=0)


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
    #: "auto": the data's (a segmentation dataset trains a segmentation model); the model must be of the task
    task: TaskName = "auto"
    epochs: int = setting(10, gt=0)
    #: per process (per GPU); the global batch is batch_size * world_size * accumulation_steps.
    batch_size: int = setting(64, gt=0)
    seed: int = 0
    #: torch.use_deterministic_algorithms; with it a run is bit-for-bit repeatable (and resumable) on CPU.
    deterministic: bool = False
    amp: AmpMode = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    #: "auto": cuda when available, else cpu.
    device: str = "auto"
    limit_train_batches: int | None = setting(None, gt=0)
    limit_val_batches: int | None = setting(None, gt=0)
    output: str = DEFAULT_OUTPUT
    #: a checkpoint to resume from ("auto": OUTPUT/checkpoints/last.pt).
    resume: str | None = None
    #: the paper's (or the recipe source's) claimed top-1, drawn on curves.png.
    reference_top1: float | None = None
    reference_label: str | None = None
    #: intra-op threads per process on CPU (0: torch's default).
    threads: int = setting(0, ge=0)
    #: on CPU with glibc: keep freed memory in the process, so steps stop page-faulting (mobilenetv3/allocator.py).
    keep_freed_memory: bool = True


# ---------------------------------------------------------------------------------------------------------
# the keys: their annotations, parsing and limits


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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


@dataclass(frozen=True)
class KeyInfo:
    """One dotted key, as the command line offers it."""

    key: str
    #: the annotation without None: bool, int, float, str, a Literal, list[float], ...
    kind: Any
    #: the values it may take (a Literal's, or the field's `choices` limit); () when any value of `kind`.
    choices: tuple[Any, ...]
    #: the built-in default (before any recipe).
    default: Any


def key_info(dotted: str) -> KeyInfo:
    """The annotation, choices and default of one dotted key (e.g. "optim.name"); an unknown key is a UserError."""
    cls: Any = TrainConfig
    default: Any = TrainConfig()
    for part in dotted.split("."):
        if not is_dataclass(cls) or part not in _hints(cls):
            raise _unknown_key(dotted)
        meta = next(f.metadata for f in fields(cls) if f.name == part)
        cls, default = _hints(cls)[part], getattr(default, part)
    kind = _without_none(cls)
    choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else tuple(meta.get("choices", ()))
    return KeyInfo(dotted, kind, choices, default)


def _without_none(hint: Any) -> Any:
    """`X | None` -> X (the first other option of a Union); any other annotation as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


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


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string, from the command line and from files alike.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _one_of(choices: tuple[Any, ...]) -> str:
    """Numbers as "8, 16 or 32", names as "one of sgd, adamw"."""
    if all(isinstance(c, numbers.Number) for c in choices):
        return f"{', '.join(map(str, choices[:-1]))} or {choices[-1]}" if len(choices) > 1 else str(choices[0])
    return f"one of {', '.join(map(str, choices))}"


def parse_value(value: Any, hint: Any, key: str) -> Any:
    """`value` (from YAML, or a string from the command line) as the annotation `hint`, or a UserError naming
    `key`.  Handles X | None ("none" / "null" -> None), Literal, list[X] ("30,60" or "[30, 60]"),
    tuple[X, Y], bool ("true" / "off" / ...), int, float ("1e-3" included) and str."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return parse_value(value, option, key)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        for choice in args:
            try:
                if parse_value(value, type(choice), key) == choice:
                    return choice
            except UserError:
                pass
        raise UserError(f"{key} must be {_one_of(args)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            except yaml.YAMLError:
                pass  # still a string: not a list
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise UserError(f"{key} must have {len(args)} values, got {value!r}")
            return tuple(parse_value(v, a, key) for v, a in zip(value, args))
        return [parse_value(v, args[0], key) for v in value]
    parse = _SCALARS.get(hint)
    return parse(value, key) if parse else value


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if not isinstance(value, bool):
        raise UserError(f"{key} must be true or false, got {value!r}")
    return value


def _parse_number(value: Any, key: str) -> int | float:
    number = value
    if isinstance(number, str):
        try:
            number = yaml.safe_load(number)
        except yaml.YAMLError:
            pass
        if isinstance(number, str) and _EXPONENT_NUMBER.fullmatch(number.strip()):
            number = float(number)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise UserError(f"{key} must be a number, got {value!r}")
    return number


def _parse_int(value: Any, key: str) -> int:
    number = _parse_number(value, key)
    if isinstance(number, float) and not number.is_integer():
        raise UserError(f"{key} must be an integer, got {number!r}")
    return int(number)


def _parse_str(value: Any, key: str) -> str:
    if value is None or isinstance(value, (dict, list)):
        raise UserError(f"{key} must be a string, got {value!r}")
    return str(value)


_SCALARS = {bool: _parse_bool, int: _parse_int, float: lambda value, key: float(_parse_number(value, key)),
            str: _parse_str}


def limit_error(key: str, value: Any, limits: typing.Mapping[str, Any]) -> str | None:
    """Why `value` breaks the `limits` of `setting` (a one-line message naming key, value and limit), or None."""
    if value is None:
        return None
    if "choices" in limits and value not in limits["choices"]:
        return f"{key} must be {_one_of(limits['choices'])}, got {value!r}"
    if "increasing" in limits and sorted(value) != list(value):
        return f"{key} must be increasing, got {value}"
    gt, ge, le = limits.get("gt"), limits.get("ge"), limits.get("le")
    low = gt if gt is not None else ge
    inside = (gt is None or value > gt) and (ge is None or value >= ge) and (le is None or value <= le)  # NaN: not
    if not inside:
        if low is not None and le is not None:
            return f"{key} must be in {'(' if gt is not None else '['}{low}, {le}], got {value}"
        if gt == 0:
            return f"{key} must be positive, got {value}"
        if low is not None:
            return f"{key} must be {'>' if gt is not None else '>='} {low}, got {value}"
        return f"{key} must be <= {le}, got {value}"
    if "odd" in limits and value % 2 == 0:
        return f"{key} must be odd, got {value}"
    return None


def check_limits(config: Any, prefix: str = "") -> None:
    """The first field of `config` (a config dataclass, its sections included) outside its `setting` limits,
    as a UserError."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            check_limits(value, f"{prefix}{f.name}.")
        elif (message := limit_error(f"{prefix}{f.name}", value, f.metadata)) is not None:
            raise UserError(message)


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass, with type conversion and strict keys


def from_dict(data: dict[str, Any], cls: type = TrainConfig, prefix: str = "", base: Any = None) -> Any:
    """A `cls` instance from nested dict `data`, starting from `base` (or the defaults)."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    instance = base if base is not None else cls()
    hints = _hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key(dotted)
        hint = hints[key]
        if is_dataclass(hint):
            setattr(instance, key, from_dict(value, hint, f"{dotted}.", getattr(instance, key)))
        else:
            setattr(instance, key, parse_value(value, hint, dotted))
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
    # A string (from the command line) is converted by the field's annotation in parse_value: "0.1" -> 0.1,
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
    """Every field within the limits declared beside it (`check_limits`), then the checks that relate
    several fields, the model name and the data settings; each error names the key."""
    check_limits(config)
    if config.schedule.warmup_epochs > config.epochs and config.schedule.name not in ("onecycle", "cyclic"):
        raise UserError(
            f"schedule.warmup_epochs ({config.schedule.warmup_epochs}) is longer than the run (epochs={config.epochs})"
        )
    if config.checkpoint.best_metric.startswith("ema_") and not config.ema.enabled:
        raise UserError(f"checkpoint.best_metric={config.checkpoint.best_metric} needs ema.enabled=true")
    if config.swa.enabled and not 1 <= config.swa.first_epoch_after(config.epochs) < config.epochs:
        raise UserError(f"swa.start_epoch ({config.swa.first_epoch_after(config.epochs)}) must be at least 1 and "
                        f"below epochs ({config.epochs}), so that training starts before averaging and some "
                        "epochs are averaged")
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
    get_entry(config.model.name)  # an unknown model is an error now, not after the data is loaded
    check_data_config(config.data)


def dump_yaml(config: TrainConfig, provenance: dict[str, Any] | None = None) -> str:
    data = to_dict(config)
    if provenance:
        data["provenance"] = provenance
    return yaml.safe_dump(data, sort_keys=False)


def replace_config(config: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(config, **changes)
