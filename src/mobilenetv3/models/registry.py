"""Model names -> constructors, `create_model` and `list_models` (the timm-style entry points)."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UnknownModelError, UserError
from .mobilenetv3 import MobileNetV3, MobileNetV3Features

_WIDTHS = {"035": 0.35, "050": 0.5, "075": 0.75, "100": 1.0, "125": 1.25}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    arch: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> None:
    _REGISTRY[entry.name] = entry


for _arch in ("large", "small"):
    for _suffix, _width in _WIDTHS.items():
        register(ModelEntry(f"mobilenetv3_{_arch}_{_suffix}", _arch, {"width_mult": _width},
                            f"MobileNetV3-{_arch.capitalize()} x{_width}"))
    register(ModelEntry(f"mobilenetv3_{_arch}_minimal_100", f"{_arch}_minimal", {"width_mult": 1.0},
                        f"MobileNetV3-{_arch.capitalize()} minimalistic x1.0"))
    # Generic builders: pass width_mult yourself.
    register(ModelEntry(f"mobilenetv3_{_arch}", _arch, {}, f"MobileNetV3-{_arch.capitalize()}, any width_mult"))
    register(ModelEntry(f"mobilenetv3_{_arch}_minimal", f"{_arch}_minimal", {},
                        f"MobileNetV3-{_arch.capitalize()} minimalistic, any width_mult"))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see `mobilenetv3 list` ({len(_REGISTRY)} models)"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def create_model(
    name: str,
    pretrained: bool | str = False,
    *,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | None = None,
    loaded_weights: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered network.

    Args:
        name: e.g. "mobilenetv3_large_100"; see `list_models()`.
        pretrained: False, True (the default published weights for this name), a weights tag such as
            "torchvision" / "timm", or a path/URL of a weights file.
        features_only: return a `MobileNetV3Features` backbone producing a list of feature maps.
        out_indices: which `feature_info` levels a features_only model returns (default: all).
        loaded_weights: when `pretrained` is a path/URL the caller has already read, that file's
            `weights.io.read_weights` result (the file is then not read again).
        **kwargs: any `MobileNetV3` argument (num_classes, in_chans, drop_rate, drop_path_rate,
            norm_layer, output_stride, width_mult for the generic builders, ...).
    """
    entry = get_entry(name)
    weights_kwargs: dict[str, Any] = {}
    weights = None
    if pretrained:  # the layout the weights were trained in (e.g. TF padding); explicit kwargs still win
        from ..weights.pretrained import is_location, pretrained_kwargs, read_location

        if loaded_weights is not None and not (isinstance(pretrained, str) and is_location(pretrained)):
            raise ValueError(f"loaded_weights goes with pretrained=<path or URL>, not pretrained={pretrained!r}")
        # a file or URL is read once, for its kwargs and its tensors
        weights = loaded_weights if loaded_weights is not None else read_location(pretrained)
        weights_kwargs = pretrained_kwargs(name, pretrained, weights)
        fixed_width = entry.defaults.get("width_mult")
        if fixed_width is not None and float(weights_kwargs.get("width_mult", fixed_width)) != fixed_width:
            raise UserError(
                f"the weights are for width_mult={weights_kwargs['width_mult']}, but {name} is x{fixed_width}; "
                f"use the generic mobilenetv3_{entry.arch} or the matching name"
            )
    model_kwargs = {**entry.defaults, **weights_kwargs, **kwargs}
    model = MobileNetV3(entry.arch, **model_kwargs)
    model.model_name = name
    if pretrained:
        from ..weights.pretrained import load_pretrained

        load_pretrained(model, name, pretrained, weights)
    if features_only:
        features = MobileNetV3Features(model, out_indices)
        features.model_name = name
        return features
    return model
