"""SSDLite, the paper's detection model (§6.2), on our `MobileNetV3`, built from torchvision's detection API.

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
from typing import Any, Dict, Sequence

import torch
from torch import nn

from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import Conv2dNormActivation, boxes as box_ops

from ...errors import UserError
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


#: torchvision's SSDLite backbone layout (its MobileNetV3 builder's width rules, BN momentum 0.03), under the
#: `MobileNetV3` arguments an `SSDLite` gets: `backbone_kwargs` override them, and only those given are in `config`
SSDLITE_BACKBONE = {"expansion_rule": "scaled_expansion", "scale_head": True, "bn_momentum": 0.03}

#: torchvision's SSDLite320 inference settings (`ssdlite320_mobilenet_v3_large`), our defaults too
SSDLITE_DEFAULTS = {"score_thresh": 0.001, "nms_thresh": 0.55, "detections_per_img": 300, "topk_candidates": 300}


class SSDLite(SSD):
    """SSDLite on MobileNetV3: a `torchvision.models.detection.SSD` (so `model(images)` is torchvision's list
    of `{boxes, labels, scores}` in eval and its loss dict `{bbox_regression, classification}` in train), whose
    backbone is our network (`SSDLiteBackbone`) and whose head is torchvision's `SSDLiteHead`.

    Every argument is plain data and kept in `self.config`, so `save_model` / `load_model` rebuild it.

    Args:
        arch: "large", "small" (or their "_minimal" variants).
        num_classes: classes including the background (index 0): 91 for COCO's category ids.
        in_chans: input channels (`image_mean` / `image_std` have one value each).
        width_mult: the backbone's and the extra blocks' width multiplier.
        reduced_tail: halve the last stage's channels (the paper's §6.1 and Table 6; torchvision's COCO weights
            have it).
        size: the square side (or [height, width]) every image is resized to inside the model (320).
        image_mean, image_std: the normalisation inside the model, of images in [0, 1] (torchvision's 0.5).
        score_thresh, nms_thresh, detections_per_img, topk_candidates: post-processing (torchvision's values).
        **backbone_kwargs: further `MobileNetV3` arguments (bn_eps, drop_path_rate, ...).
    """

    def __init__(
        self,
        arch: str = "large",
        *,
        num_classes: int = 91,
        in_chans: int = 3,
        width_mult: float = 1.0,
        reduced_tail: bool = True,
        size: int | Sequence[int] = 320,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        score_thresh: float = SSDLITE_DEFAULTS["score_thresh"],
        nms_thresh: float = SSDLITE_DEFAULTS["nms_thresh"],
        detections_per_img: int = SSDLITE_DEFAULTS["detections_per_img"],
        topk_candidates: int = SSDLITE_DEFAULTS["topk_candidates"],
        **backbone_kwargs: Any,
    ) -> None:
        if num_classes < 2:
            raise UserError(f"a detector needs num_classes >= 2 (the background is class 0), got {num_classes}")
        for key in ("features_only", "out_indices", "output_stride", "num_classes"):
            if key in backbone_kwargs:
                raise UserError(f"{key} is not an option of an SSDLite model (its backbone is `model.backbone`)")
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(height, width) < 32:
            raise UserError(f"SSDLite needs an input size of at least 32 pixels, got {height}x{width}")
        image_mean = [0.5] * in_chans if image_mean is None else [float(v) for v in image_mean]
        image_std = [0.5] * in_chans if image_std is None else [float(v) for v in image_std]
        if len(image_mean) != in_chans or len(image_std) != in_chans:
            raise UserError(f"image_mean / image_std need {in_chans} values each, got {image_mean} / {image_std}")
        # torchvision's SSDLite backbone settings: BN eps 0.001 / momentum 0.03 and its width rules
        layout = {**SSDLITE_BACKBONE, **backbone_kwargs}
        network = MobileNetV3(arch, num_classes=0, in_chans=in_chans, width_mult=width_mult,
                              reduced_tail=reduced_tail, **layout)
        norm_layer = partial(nn.BatchNorm2d, eps=network.config["bn_eps"], momentum=network.config["bn_momentum"])
        backbone = SSDLiteBackbone(network, width_mult=width_mult, norm_layer=norm_layer)
        anchors = DefaultBoxGenerator([[2, 3] for _ in range(len(backbone.out_channels))], min_ratio=0.2,
                                      max_ratio=0.95)
        head = SSDLiteHead(backbone.out_channels, anchors.num_anchors_per_location(), num_classes, norm_layer)
        # torchvision's SSD reads `size` as (width, height) (GeneralizedRCNNTransform's fixed_size)
        super().__init__(backbone, anchors, (width, height), num_classes, image_mean=image_mean,
                         image_std=image_std, head=head, score_thresh=score_thresh, nms_thresh=nms_thresh,
                         detections_per_img=detections_per_img, topk_candidates=topk_candidates)
        self.config: Dict[str, Any] = {
            **{k: v for k, v in network.config.items() if k in backbone_kwargs},
            "arch": arch, "num_classes": num_classes, "in_chans": in_chans, "width_mult": float(width_mult),
            "reduced_tail": bool(reduced_tail), "size": [height, width], "image_mean": image_mean,
            "image_std": image_std, "score_thresh": float(score_thresh), "nms_thresh": float(nms_thresh),
            "detections_per_img": int(detections_per_img), "topk_candidates": int(topk_candidates),
        }
        self.model_name: str | None = None
        self.preprocessing = None
        self.class_names: list[str] | None = None
        self.num_classes = num_classes

    def forward_with_loss(self, images: list[torch.Tensor], targets: list[Dict[str, torch.Tensor]]
                          ) -> tuple[Dict[str, torch.Tensor], list[Dict[str, torch.Tensor]]]:
        """(The training losses, the detections) of one pass in the current mode, for validation: what
        `SSD.forward` computes in train mode (matching, then `compute_loss`) and in eval mode (post-processing),
        from the same head outputs.  Steps as torchvision's `SSD.forward`, whose public methods it calls."""
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        batch, targets = self.transform(images, targets)
        features = list(self.backbone(batch.tensors).values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(batch, features)
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            if target["boxes"].numel() == 0:
                matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                          device=anchors_per_image.device))
            else:
                matched.append(self.proposal_matcher(box_ops.box_iou(target["boxes"], anchors_per_image)))
        # in float32 under autocast too: bf16 boxes would be rounded to 1-2 px at 320 px
        head_outputs = {key: value.float() for key, value in head_outputs.items()}
        losses = self.compute_loss(targets, head_outputs, anchors, matched)
        detections = self.postprocess_detections(head_outputs, anchors, batch.image_sizes)
        return losses, self.transform.postprocess(detections, batch.image_sizes, original_sizes)
