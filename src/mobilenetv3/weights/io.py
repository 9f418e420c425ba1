"""Self-describing weights files (safetensors + metadata) and safe checkpoint reading.

A weights file holds the model's tensors plus string metadata:
  format="mobilenetv3", format_version, model_name, model_kwargs (JSON), num_classes,
  preprocessing (JSON, see `Preprocessing`), class_names (JSON list, optional), extra (JSON, optional).
`load_model` rebuilds the network from that alone, or from a training checkpoint (a `torch.save`d dict
with the keys in `CHECKPOINT_MODEL_KEYS`), which is always read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError, first_line
from ..files import missing_file_error
from ..models.registry import get_entry
from ..preprocessing import Preprocessing

FORMAT = "mobilenetv3"
FORMAT_VERSION = "1"
SAFETENSORS_SUFFIXES = (".safetensors",)


def model_description(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """(model_name, kwargs) that rebuild `model` through `create_model`, from the model's own record."""
    config = dict(getattr(model, "config", {}))
    if not config:
        raise UserError(f"{type(model).__name__} is not a mobilenetv3 model (no .config to describe it)")
    norm_layer = config.get("norm_layer")
    if callable(norm_layer):
        # A callable can't be stored. A BatchNorm flavour (e.g. a partial of BatchNorm2d) has the same tensors
        # as "batchnorm"; anything else (GroupNorm, ...) could not be rebuilt from the file, so refuse it.
        target = getattr(norm_layer, "func", norm_layer)
        if not (isinstance(target, type) and issubclass(target, torch.nn.modules.batchnorm._BatchNorm)):
            raise UserError(
                f"cannot describe norm_layer={norm_layer!r} in a weights file; use norm_layer='batchnorm' "
                "or save the state_dict yourself"
            )
        config["norm_layer"] = "batchnorm"
    arch = config.pop("arch")
    name = model.model_name or f"mobilenetv3_{arch}"
    if get_entry(name).arch != arch:  # e.g. renamed; fall back to the generic builder of this arch
        name = f"mobilenetv3_{arch}"
    if getattr(model, "out_indices", None) is not None:  # a MobileNetV3Features backbone
        config["features_only"] = True
        config["out_indices"] = list(model.out_indices)
    return name, config


def model_metadata(
    model: nn.Module, preprocessing: Preprocessing, class_names: Sequence[str] | None = None,
) -> dict[str, str]:
    """The string metadata that rebuilds and feeds `model`, shared by weights files and exported artifacts:
    model_name, model_kwargs (JSON), num_classes, preprocessing (JSON) and class_names (JSON, when given)."""
    name, kwargs = model_description(model)
    num_classes = int(kwargs.get("num_classes", 1000))
    if class_names is not None and len(class_names) != num_classes:
        raise UserError(f"{len(class_names)} class names given for a model with {num_classes} classes")
    metadata = {
        "model_name": name,
        "model_kwargs": json.dumps(kwargs, sort_keys=True),
        "num_classes": str(num_classes),
        "preprocessing": json.dumps(preprocessing.to_dict()),
    }
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    return metadata


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    preprocessing: Preprocessing | None = None,
    class_names: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` as a self-describing safetensors file (atomically: temp file, then rename).

    `preprocessing` defaults to `Preprocessing.default` for the model's input channels."""
    if preprocessing is None:
        preprocessing = Preprocessing.default(int(model.config.get("in_chans", 3)))
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                **model_metadata(model, preprocessing, class_names)}
    if extra:
        metadata["extra"] = json.dumps(dict(extra), sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), fsync, then rename onto `path`: a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as error:
        full = _disk_full(error, path.parent)  # judged before the partial temp file is removed
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise UserError(f"no space left on device while writing {path}; the previous file is unchanged "
                            "(free some space, then resume)") from error
        raise


#: Below this much free space, a failed write is reported as a full disk: torch.save reports ENOSPC as a
#: RuntimeError ("unexpected pos ..." / "file write failed") without an errno.
DISK_FULL_MARGIN_BYTES = 1 << 20


def _disk_full(error: BaseException, directory: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(directory).free < DISK_FULL_MARGIN_BYTES
    except OSError:
        return False


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise missing_file_error(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True: a pickle that would run code is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise missing_file_error(path, "checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is long; keep the line that says what was refused (e.g. "GLOBAL posix.system").
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), None)
        if refused is None:  # not a pickle at all (garbage bytes, a truncated legacy file, ...)
            raise UserError(f"{path} is not a readable PyTorch checkpoint ({lines[-1] if lines else 'bad data'})") from None
        raise UserError(f"refusing to load {path}: it is not a plain-data checkpoint ({refused})") from None
    except Exception as error:  # garbage bytes make the unpickler fail in many ways (IndexError, EOFError, ...)
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line(error)})") from None


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "") -> None:
    """load_state_dict(strict=True), but the error names the first missing, unexpected or mis-shaped key."""
    where = f" in {source}" if source else ""
    # Walk the model's own order so "first" means the first layer that does not fit.
    for key, expected in model.state_dict().items():
        if key not in state_dict:
            missing = sum(k not in state_dict for k in model.state_dict())
            raise UserError(f"missing key {key!r}{where} ({missing} missing in all)")
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise UserError(f"key {key!r}{where} is not a tensor")
        if tuple(value.shape) != tuple(expected.shape):
            raise UserError(
                f"shape mismatch for {key!r}{where}: file has {tuple(value.shape)}, model expects {tuple(expected.shape)}"
            )
    unexpected = [key for key in state_dict if key not in model.state_dict()]
    if unexpected:
        raise UserError(f"unexpected key {unexpected[0]!r}{where} (not in {type(model).__name__})")
    model.load_state_dict(state_dict, strict=True)


def load_state_with_own_versions(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state_dict)` (strict), with `module`'s own per-submodule version metadata attached.

    `nn.Module.state_dict()` carries each submodule's `_version`; the plain dicts checkpoints store do not, and
    a missing version means version 1 to `_load_from_state_dict`.  torchao's observers then reset their `eps`
    buffer to float32's (it became a buffer in version 2), so a QAT graph's learnt ranges would round
    differently after a resume.  The state comes from this code's own modules, so their versions are right.
    """
    state = collections.OrderedDict(state_dict)
    state._metadata = getattr(module.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    module.load_state_dict(state, strict=True)


#: Keys a training checkpoint carries so that `load_model` can rebuild its network.
CHECKPOINT_MODEL_KEYS = ("model_name", "model_kwargs", "model")


def _json_field(metadata: dict[str, str], key: str, path: Path, default: Any = None) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata field {key!r} is not valid JSON") from None


class LoadedWeights:
    """What a weights file or checkpoint describes: tensors, how to build the net, and preprocessing."""

    def __init__(
        self,
        path: Path,
        model_name: str,
        model_kwargs: dict[str, Any],
        state_dict: dict[str, torch.Tensor],
        preprocessing: Preprocessing,
        class_names: list[str] | None,
        extra: dict[str, Any],
    ) -> None:
        self.path = path
        self.model_name = model_name
        self.model_kwargs = model_kwargs
        self.state_dict = state_dict
        self.preprocessing = preprocessing
        self.class_names = class_names
        self.extra = extra


def read_weights(path: str | os.PathLike, *, ema: bool = False) -> LoadedWeights:
    """Read a weights file (.safetensors) or a training checkpoint (anything else) without building a model.

    With `ema=True`, a checkpoint's EMA weights are used (an error if it has none).
    """
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") != FORMAT or "model_name" not in metadata:
            raise UserError(
                f"{path} has no mobilenetv3 metadata (model_name); convert peer weights with `mobilenetv3 convert`"
            )
        if ema:
            raise UserError(f"{path} is a weights file; --ema applies to training checkpoints only")
        kwargs = _json_field(metadata, "model_kwargs", path, {})
        prep = _json_field(metadata, "preprocessing", path, None)
        return LoadedWeights(
            path,
            metadata["model_name"],
            kwargs,
            tensors,
            Preprocessing.from_dict(prep) if prep else Preprocessing.default(int(kwargs.get("in_chans", 3))),
            _json_field(metadata, "class_names", path, None),
            _json_field(metadata, "extra", path, {}),
        )
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in CHECKPOINT_MODEL_KEYS):
        raise UserError(
            f"{path} is not a mobilenetv3 weights file or training checkpoint "
            f"(expected keys {', '.join(CHECKPOINT_MODEL_KEYS)}); for a peer's state_dict use `mobilenetv3 convert`"
        )
    state_dict = checkpoint["model"]
    if ema:
        if not checkpoint.get("ema"):
            raise UserError(f"{path} has no EMA weights (the run was trained without EMA)")
        state_dict = checkpoint["ema"]
    prep = checkpoint.get("preprocessing")
    kwargs = dict(checkpoint["model_kwargs"])
    return LoadedWeights(
        path,
        str(checkpoint["model_name"]),
        kwargs,
        dict(state_dict),
        Preprocessing.from_dict(prep) if prep else Preprocessing.default(int(kwargs.get("in_chans", 3))),
        checkpoint.get("class_names"),
        # the run's config too: eval and quantize rebuild its data from it without reading the file again
        # "qat": a quantization-aware training run's checkpoint (its "model" is the fake-quantized graph's state)
        {k: v for k, v in checkpoint.items() if k in ("epoch", "step", "metrics", "config") or (k == "qat" and v)},
    )


def build_model(weights: LoadedWeights, **overrides: Any) -> nn.Module:
    """Build the network a `LoadedWeights` describes and load its tensors (strict, with clear errors)."""
    if weights.extra.get("qat"):
        raise UserError(
            f"{weights.path} is a quantization-aware training checkpoint (a fake-quantized graph, not float weights): "
            f"make its int8 program with `mobilenetv3 quantize --checkpoint {weights.path} --output model_int8.pte` "
            "(the run writes checkpoints/int8.pte when it ends), then eval, predict or bench the .pte")
    kwargs = {**weights.model_kwargs, **overrides}
    try:
        model = get_entry(weights.model_name).build(**kwargs)
    except TypeError as error:
        raise UserError(f"{weights.path}: metadata does not describe a buildable model ({error})") from None
    load_state_dict_checked(model, weights.state_dict, source=str(weights.path))
    return model


def load_model(path: str | os.PathLike, *, ema: bool = False, eval_mode: bool = True) -> nn.Module:
    """Rebuild a model from a weights file or a training checkpoint.

    The returned model carries `.preprocessing` (a `Preprocessing`) and `.class_names` (list or None).
    """
    weights = read_weights(path, ema=ema)
    model = build_model(weights)
    model.preprocessing = weights.preprocessing
    model.class_names = weights.class_names
    return model.eval() if eval_mode else model
