"""`create_model(name, pretrained=...)`: the registry's builders plus the published-weights table (as timm's
`_factory.py` above `_registry.py`).  This is the public entry, `mobilenetv3.create_model`."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import UserError
from .models.mobilenetv3 import MobileNetV3Features
from .models.registry import get_entry
from .weights.pretrained import is_location, load_pretrained, pretrained_kwargs, read_location


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
    if not pretrained:
        return entry.build(features_only=features_only, out_indices=out_indices, **kwargs)
    if loaded_weights is not None and not (isinstance(pretrained, str) and is_location(pretrained)):
        raise ValueError(f"loaded_weights goes with pretrained=<path or URL>, not pretrained={pretrained!r}")
    # a file or URL is read once, for its kwargs and its tensors
    weights = loaded_weights if loaded_weights is not None else read_location(pretrained)
    # the layout the weights were trained in (e.g. TF padding); explicit kwargs still win
    weights_kwargs = pretrained_kwargs(name, pretrained, weights)
    fixed_width = entry.defaults.get("width_mult")
    if fixed_width is not None and float(weights_kwargs.get("width_mult", fixed_width)) != fixed_width:
        raise UserError(
            f"the weights are for width_mult={weights_kwargs['width_mult']}, but {name} is x{fixed_width}; "
            f"use the generic mobilenetv3_{entry.arch} or the matching name"
        )
    model = entry.build(**{**weights_kwargs, **kwargs})
    load_pretrained(model, name, pretrained, weights)
    return MobileNetV3Features(model, out_indices) if features_only else model
