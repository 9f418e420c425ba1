"""Model names -> builders, and `list_models` (as timm's `_registry`): names and metadata, nothing about weights.

`mobilenetv3.create_model` (in `mobilenetv3.factory`) sits above this registry and the weights package.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UnknownModelError, UserError
from .heads.lraspp import LRASPP, LRASPP_BACKBONE
from .mobilenetv3 import MobileNetV3, MobileNetV3Features

_WIDTHS = {"035": 0.35, "050": 0.5, "075": 0.75, "100": 1.0, "125": 1.25}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    arch: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: "" for the classifier; "lraspp" for the segmentation network (`heads.LRASPP`); "ssdlite" for the
    #: detector (`heads.ssdlite.SSDLite`, a torchvision `SSD`)
    head: str = ""

    @property
    def task(self) -> str:
        return HEAD_TASKS[self.head]

    def build(
        self, *, features_only: bool = False, out_indices: tuple[int, ...] | list[int] | None = None, **kwargs: Any,
    ) -> nn.Module:
        """This network with fresh weights: `MobileNetV3(arch, **defaults, **kwargs)` (or `LRASPP(...)`), or with
        `features_only` its `MobileNetV3Features` backbone returning the `out_indices` levels of `feature_info`
        (default all)."""
        if self.head == "ssdlite":
            if features_only or out_indices is not None:
                raise UserError(f"{self.name} is a detector: its feature maps are `model.backbone(x)` (C4, C5 and the "
                                "extra blocks'); features_only is for the classifiers and LR-ASPP")
            from .heads.ssdlite import SSDLite  # imported on use: torchvision's detection package is slow to import

            model = SSDLite(self.arch, **{**self.defaults, **kwargs})
            model.model_name = self.name
            return model
        if self.head == "lraspp" and not features_only:
            if out_indices is not None:
                raise UserError("out_indices goes with features_only=True")
            model = LRASPP(self.arch, **{**self.defaults, **kwargs})
            model.model_name = self.name
            return model
        if self.head == "lraspp":  # its backbone alone: reduced tail, dilated to output stride 16, no classifier
            kwargs = {**LRASPP_BACKBONE, **self.defaults, **kwargs, "num_classes": 0}
            for head_only in ("inter_channels", "head"):
                kwargs.pop(head_only, None)
            model = MobileNetV3(self.arch, **kwargs)
            model.model_name = self.name
            return MobileNetV3Features(model, out_indices)
        model = MobileNetV3(self.arch, **{**self.defaults, **kwargs})
        model.model_name = self.name
        return MobileNetV3Features(model, out_indices) if features_only else model


#: an entry's head -> the task its network does
HEAD_TASKS = {"": "classification", "lraspp": "segmentation", "ssdlite": "detection"}

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
    # LR-ASPP segmentation (the paper's §6.3): reduced tail, output stride 16 unless given.
    for _suffix, _width in _WIDTHS.items():
        register(ModelEntry(f"lraspp_mobilenetv3_{_arch}_{_suffix}", _arch, {"width_mult": _width},
                            f"LR-ASPP segmentation on MobileNetV3-{_arch.capitalize()} x{_width}", head="lraspp"))
    register(ModelEntry(f"lraspp_mobilenetv3_{_arch}", _arch, {},
                        f"LR-ASPP segmentation on MobileNetV3-{_arch.capitalize()}, any width_mult", head="lraspp"))
    # SSDLite detection (the paper's §6.2): reduced tail, 320x320 unless given (torchvision's names).
    for _suffix, _width in _WIDTHS.items():
        register(ModelEntry(f"ssdlite320_mobilenetv3_{_arch}_{_suffix}", _arch, {"width_mult": _width},
                            f"SSDLite detection on MobileNetV3-{_arch.capitalize()} x{_width}, 320x320",
                            head="ssdlite"))
    register(ModelEntry(f"ssdlite_mobilenetv3_{_arch}", _arch, {},
                        f"SSDLite detection on MobileNetV3-{_arch.capitalize()}, any width_mult and size",
                        head="ssdlite"))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see `mobilenetv3 list` ({len(_REGISTRY)} models)"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]
