"""SSDLite, the paper's detection model (§6.2), on our `MobileNetV3`, built from torchvision's detection API.

WORK IN PROGRESS (issue 26, branch wip-26-ssdlite): the backbone and the builder only; no registry names,
conversion, training, data or export yet.

- The backbone is our own network, tapped twice: C4 is the output of the *expansion* layer of the last stage's
  first block (the paper's "13th bneck", output stride 16, before its depthwise conv); C5 is the last 1x1 conv
  (output stride 32).  Four extra blocks (1x1 -> 3x3 depthwise stride 2 -> 1x1, ReLU6) follow at strides
  64..512, as torchvision's `SSDLiteFeatureExtractorMobileNet` has them (same module layout, so that its COCO
  weights can be mapped key for key).
- Anchors, box coding, matching, the losses, NMS and the resize/normalise transform are torchvision's:
  `torchvision.models.detection.SSD` with `DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)`
  and its `SSDLiteHead` (3x3 depthwise + 1x1 prediction blocks).

Facts for the conversion (torchvision 0.29): `ssdlite320_mobilenet_v3_large(weights=COCO_V1)` builds its
backbone with `reduced_tail=True` (weights given -> weights_backbone None -> reduce_tail), BN eps 0.001 and
momentum 0.03, 3,440,060 parameters at 91 classes; torchvision's C4 tap is `features[c4_pos].block[0]`.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Dict

import torch
from torch import nn

from ..mobilenetv3 import MobileNetV3


class _AfterExpansion(nn.Module):
    """The rest of a strided block after its expansion layer: depthwise, squeeze-excite, projection (a strided
    block has no residual)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if block.has_skip:
            raise ValueError("the C4 block must be strided (no residual)")
        self.depthwise, self.se, self.project = block.depthwise, block.se, block.project
        self.has_se = block.has_se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(x)
        if self.has_se:
            x = self.se(x)
        return self.project(x)


def _extra_block(in_channels: int, out_channels: int, norm_layer) -> nn.Sequential:
    """torchvision's SSDLite extra block: 1x1 to half, 3x3 depthwise stride 2, 1x1 to `out_channels`, ReLU6."""
    from torchvision.ops import Conv2dNormActivation

    mid = out_channels // 2
    return nn.Sequential(
        Conv2dNormActivation(in_channels, mid, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, mid, kernel_size=3, stride=2, groups=mid, norm_layer=norm_layer,
                             activation_layer=nn.ReLU6),
        Conv2dNormActivation(mid, out_channels, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
    )


def normal_init(module: nn.Module) -> None:
    """torchvision's SSDLite initialisation of the extra blocks and the head: N(0, 0.03) weights, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=0.03)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class SSDLiteBackbone(nn.Module):
    """`forward(x)` -> OrderedDict "0".."5" of the C4 expansion, C5 and the four extra blocks' maps."""

    def __init__(self, network: MobileNetV3, *, width_mult: float = 1.0, min_depth: int = 16,
                 norm_layer: Any = None) -> None:
        super().__init__()
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        reductions = [info["reduction"] for info in network.layer_info]  # [stem, *blocks, final_conv]
        # the last stage's first block: the first block whose output is at the network's last stride
        c4 = next(i for i, r in enumerate(reductions[1:-1]) if r == reductions[-1])
        block = network.blocks[c4]
        self.body = nn.Sequential(network.stem, *list(network.blocks)[:c4], block.expand)
        self.tail = nn.Sequential(_AfterExpansion(block), *list(network.blocks)[c4 + 1:], network.final_conv)
        depth = lambda d: max(min_depth, int(d * width_mult))  # noqa: E731
        c5_channels = network.final_conv.conv.out_channels
        self.extra = nn.ModuleList([
            _extra_block(c5_channels, depth(512), norm_layer),
            _extra_block(depth(512), depth(256), norm_layer),
            _extra_block(depth(256), depth(256), norm_layer),
            _extra_block(depth(256), depth(128), norm_layer),
        ])
        normal_init(self.extra)
        self.out_channels = [block.expand.conv.out_channels, c5_channels, depth(512), depth(256), depth(256),
                             depth(128)]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        c4 = self.body(x)
        outputs = [c4, self.tail(c4)]
        x = outputs[-1]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return OrderedDict((str(i), out) for i, out in enumerate(outputs))


def ssdlite(arch: str = "large", *, num_classes: int = 91, width_mult: float = 1.0, reduced_tail: bool = True,
            size: tuple[int, int] = (320, 320), **ssd_kwargs: Any):
    """A `torchvision.models.detection.SSD` on our network: torchvision's SSDLite320 settings (score_thresh
    0.001, nms 0.55, 300 detections, mean/std 0.5) unless `ssd_kwargs` say otherwise."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.ssdlite import SSDLiteHead

    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    network = MobileNetV3(arch, num_classes=0, width_mult=width_mult, reduced_tail=reduced_tail,
                          expansion_rule="scaled_expansion", scale_head=True, bn_momentum=0.03)
    backbone = SSDLiteBackbone(network, width_mult=width_mult, norm_layer=norm_layer)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    head = SSDLiteHead(backbone.out_channels, anchors.num_anchors_per_location(), num_classes, norm_layer)
    defaults = {"score_thresh": 0.001, "nms_thresh": 0.55, "detections_per_img": 300, "topk_candidates": 300,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return SSD(backbone, anchors, size, num_classes, head=head, **{**defaults, **ssd_kwargs})
