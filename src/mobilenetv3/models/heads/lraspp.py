"""LR-ASPP, the paper's segmentation head (§6.3, figure 10), on our `MobileNetV3` backbone.

The backbone is `MobileNetV3Features` over our own network: the last stage dilated to output stride 16 (or 8),
with the paper's reduced tail (§6.1) by default.  The head has two branches on the stride-16 features
(a 1x1 conv + BN + ReLU, gated by a sigmoid of pooled features) and a 1x1 classifier on the stride-8
low-level features; the two logit maps are added and upsampled to the input size.

Where it differs from the paper, it follows torchvision's `LRASPP` (so that torchvision's weights convert
exactly, and key for key: `classifier.*` are torchvision's names):

- the gate pools globally (`AdaptiveAvgPool2d(1)`), where the paper uses a 49x49 average pool with stride
  (16, 20) on 1024x2048 Cityscapes crops.  Global pooling does not depend on the input size, so an export
  traced at one size runs at any other;
- the low-level features are the output of the first block at stride 8 (torchvision's "C2"), not the last;
- the block whose stride the dilation removes is dilated too (torchvision's `dilated=True`,
  `dilate_strided_block=True`); TF and timm keep its old dilation.

torchvision's `lraspp_mobilenet_v3_large` is this network with `reduced_tail=False` and torchvision's width
rules (see `weights.convert`); at width 1.0 those rules give the same channel counts as ours.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from ...preprocessing import Preprocessing
from ..mobilenetv3 import MobileNetV3, MobileNetV3Features, init_weights


#: The backbone settings LR-ASPP defaults to (what `create_model("lraspp_...", features_only=True)` builds).
LRASPP_BACKBONE = {"reduced_tail": True, "output_stride": 16, "dilate_strided_block": True}


class LRASPPHead(nn.Module):
    """The head: `low_classifier(low) + high_classifier(upsample(cbr(high) * scale(high)))` (torchvision's
    layout and module names)."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int,
                 norm_layer: Any = nn.BatchNorm2d) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            norm_layer(inter_channels),
            nn.ReLU(inplace=True),
        )
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),  # global: no traced size baked in (the paper: 49x49 pool, stride (16, 20))
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class Conv1x1Head(nn.Module):
    """The plain baseline LR-ASPP is measured against (`head="conv1x1"`): one 1x1 conv from the stride-16
    features to the class logits, no gate and no low-level branch."""

    def __init__(self, high_channels: int, num_classes: int) -> None:
        super().__init__()
        self.high_classifier = nn.Conv2d(high_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.high_classifier(high)


#: `LRASPP(head=...)`: the paper's head, or the 1x1-conv baseline on the same backbone (for the ablation).
HEADS = ("lraspp", "conv1x1")


class LRASPP(nn.Module):
    """MobileNetV3 + LR-ASPP: `forward(x)` returns `{"out": logits}` at `x`'s height and width (torchvision's
    segmentation contract).

    Every argument is plain data and kept in `self.config`, so `save_model` / `load_model` rebuild it.

    Args:
        arch: "large", "small" (or their "_minimal" variants).
        num_classes: classes including the background (21 for Pascal VOC).
        in_chans: input channels.
        width_mult: the backbone's width multiplier.
        reduced_tail: halve the last stage's channels (the paper's §6.1; torchvision's weights have it off).
        output_stride: 16 (the paper) or 8; the strides past it become dilation.
        inter_channels: the head's width (128 in the paper and torchvision).
        head: "lraspp", or "conv1x1" for the plain 1x1-conv head on the same backbone (the baseline of the
            head's ablation in benchmarks/segmentation.py; not convertible to torchvision).
        **backbone_kwargs: further `MobileNetV3` arguments (layout rules, BN settings, drop_path_rate, ...).
    """

    def __init__(
        self,
        arch: str = "large",
        *,
        num_classes: int = 21,
        in_chans: int = 3,
        width_mult: float = 1.0,
        reduced_tail: bool = True,
        output_stride: int = 16,
        inter_channels: int = 128,
        dilate_strided_block: bool = True,
        head: str = "lraspp",
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise UserError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if output_stride not in (8, 16):
            raise UserError(f"LR-ASPP needs output_stride 16 or 8, got {output_stride}")
        if num_classes < 1 or inter_channels < 1:
            raise UserError(f"num_classes and inter_channels must be >= 1, got {num_classes} and {inter_channels}")
        for key in ("features_only", "out_indices"):
            if key in backbone_kwargs:
                raise UserError(f"{key} is not an option of an LR-ASPP model (its backbone is `model.backbone`)")
        network = MobileNetV3(
            arch, num_classes=0, in_chans=in_chans, width_mult=width_mult, reduced_tail=reduced_tail,
            output_stride=output_stride, dilate_strided_block=dilate_strided_block, **backbone_kwargs,
        )
        self.config: Dict[str, Any] = {
            **{k: v for k, v in network.config.items() if k in backbone_kwargs},
            "arch": arch, "num_classes": num_classes, "in_chans": in_chans, "width_mult": float(width_mult),
            "reduced_tail": bool(reduced_tail), "output_stride": int(output_stride),
            "inter_channels": int(inter_channels), "dilate_strided_block": bool(dilate_strided_block),
        }
        if head != "lraspp":  # kept only when set: files written before the option rebuild the same network
            self.config["head"] = head
        self.model_name: str | None = None
        self.preprocessing: Preprocessing | None = None
        self.class_names: list[str] | None = None
        self.num_classes = num_classes
        # low: the first layer at stride 8 (torchvision's C2); high: the last 1x1 conv, at output_stride
        layers = network.layer_info
        low = next(i for i, info in enumerate(layers) if info["reduction"] == 8)
        high = len(layers) - 1
        self.backbone = MobileNetV3Features(network, layer_ids=[low, high])
        #: the backbone's two taps: [low (stride 8), high (stride `output_stride`)]
        self.feature_info = self.backbone.feature_info
        low_channels, high_channels = self.backbone.feature_info.channels()
        norm = partial_norm(network)
        self.classifier = (LRASPPHead(low_channels, high_channels, num_classes, inter_channels, norm)
                           if head == "lraspp" else Conv1x1Head(high_channels, num_classes))
        init_weights(self.classifier)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        low, high = self.backbone(x)
        out = self.classifier(low, high)
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        result = OrderedDict()  # torchvision's segmentation contract (and scriptable as Dict[str, Tensor])
        result["out"] = out
        return result


def partial_norm(network: MobileNetV3):
    """The head's norm layer: the backbone's kind (BatchNorm or SyncBatchNorm) with PyTorch's default eps and
    momentum, as torchvision's head uses."""
    kind = network.config.get("norm_layer")
    return nn.SyncBatchNorm if kind == "syncbatchnorm" else nn.BatchNorm2d
