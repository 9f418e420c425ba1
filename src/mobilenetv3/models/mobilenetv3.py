"""The MobileNetV3 network: stem -> bneck blocks -> last 1x1 conv -> pool -> head conv -> classifier."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, List

import torch
from torch import nn

from ..errors import UserError
from ..preprocessing import Preprocessing
from .. import cpu_routes
from .layers import ConvNormAct, InvertedResidual, NormLayer, make_activation, make_conv
from .spec import (
    NETWORK_SPECS,
    ExpansionRule,
    LayoutOptions,
    NetworkSpec,
    Padding,
    ResolvedNetwork,
    resolve,
)

NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "batchnorm": nn.BatchNorm2d,
    "syncbatchnorm": nn.SyncBatchNorm,
}


def _norm_factory(norm_layer: str | Callable[..., nn.Module] | None, eps: float, momentum: float) -> NormLayer:
    if norm_layer is None or isinstance(norm_layer, str):
        name = norm_layer or "batchnorm"
        if name not in NORM_LAYERS:
            raise UserError(f"unknown norm_layer {name!r}; choose from {', '.join(NORM_LAYERS)}")
        return partial(NORM_LAYERS[name], eps=eps, momentum=momentum)
    return norm_layer


def _layout(kwargs: dict[str, Any]) -> LayoutOptions:
    return LayoutOptions(
        width_mult=float(kwargs["width_mult"]),
        expansion_rule=ExpansionRule(kwargs["expansion_rule"]),
        fix_stem=bool(kwargs["fix_stem"]),
        scale_head=bool(kwargs["scale_head"]),
        head_bias=bool(kwargs["head_bias"]),
        se_round_to_divisor=bool(kwargs["se_round_to_divisor"]),
        padding=Padding(kwargs["padding"]),
        block_repeats=tuple(int(n) for n in kwargs["block_repeats"]) if kwargs.get("block_repeats") else None,
        se_activation_from_block=bool(kwargs.get("se_activation_from_block", False)),
        first_block_residual=bool(kwargs.get("first_block_residual", True)),
        reduced_tail=bool(kwargs.get("reduced_tail", False)),
    )


def _feature_taps(network: ResolvedNetwork, stem_stride: int) -> list[int]:
    """Indices into [stem, *blocks, final_conv] of the last layer at each spatial resolution."""
    strides = [stem_stride] + [b.stride for b in network.blocks] + [1]
    return [i for i in range(len(strides)) if i == len(strides) - 1 or strides[i + 1] > 1]


class FeatureInfo(list):
    """A list of {num_chs, reduction, module, index} dicts with timm's accessor methods."""

    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self]

    def reduction(self) -> list[int]:
        return [info["reduction"] for info in self]

    def module_name(self) -> list[str]:
        return [info["module"] for info in self]


def _check_arguments(config: dict[str, Any]) -> None:
    """The constructor's limits, checked before anything is built (one-line errors naming the argument)."""
    if config["arch"] not in NETWORK_SPECS:
        raise UserError(f"unknown MobileNetV3 arch {config['arch']!r}; choose from {', '.join(NETWORK_SPECS)}")
    if config["output_stride"] not in (8, 16, 32):
        raise UserError(f"output_stride must be 8, 16 or 32, got {config['output_stride']}")
    if config["stem_stride"] not in (1, 2):
        raise UserError(f"stem_stride must be 1 or 2, got {config['stem_stride']}")
    if config["num_classes"] < 0 or config["in_chans"] < 1:
        raise UserError(f"num_classes must be >= 0 and in_chans >= 1, got {config['num_classes']} and "
                        f"{config['in_chans']}")
    if not 0.0 <= config["drop_rate"] < 1.0 or not 0.0 <= config["drop_path_rate"] < 1.0:
        raise UserError("drop_rate and drop_path_rate must be in [0, 1)")
    if config["final_conv_repeats"] < 1:
        raise UserError(f"final_conv_repeats must be >= 1, got {config['final_conv_repeats']}")


def _make_blocks(network: ResolvedNetwork, norm: NormLayer, padding: Padding, *, stem_stride: int,
                 output_stride: int, drop_path_rate: float,
                 dilate_strided_block: bool = False) -> tuple[list[nn.Module], list[int]]:
    """The bneck blocks of a resolved network, and the running stride after the stem and after each block.

    Once the running stride reaches `output_stride`, later strides become dilation.  The block that would have
    strided still uses the old dilation, as in the TF/timm builders, or with `dilate_strided_block` already
    the new one, as torchvision's `dilated=True` does.  Stochastic depth grows linearly with depth.
    """
    blocks: list[nn.Module] = []
    reductions = [stem_stride]
    stride_so_far, dilation = stem_stride, 1
    for index, block in enumerate(network.blocks):
        stride, next_dilation, block_dilation = block.stride, dilation, dilation
        if stride > 1:
            if stride_so_far * stride > output_stride:
                next_dilation, stride = dilation * stride, 1
                block_dilation = next_dilation if dilate_strided_block else dilation
            else:
                stride_so_far *= stride
        blocks.append(InvertedResidual(
            block.in_channels, block.expanded_channels, block.out_channels, kernel_size=block.kernel_size,
            stride=stride, dilation=block_dilation, squeeze_channels=block.squeeze_channels, activation=block.activation,
            norm_layer=norm, padding=padding, drop_path_rate=drop_path_rate * index / len(network.blocks),
            se_activation=block.se_activation, residual=block.residual,
        ))
        reductions.append(stride_so_far)
        dilation = next_dilation
    return blocks, reductions


#: `MobileNetV3.config` keys added after checkpoints and weights files were first written, with the value that
#: gives the network older files describe (a file without the key was written before it existed).
ADDED_CONFIG_KEYS = {"reduced_tail": False, "dilate_strided_block": False}


class MobileNetV3(nn.Module):
    """MobileNetV3-Large / -Small as in the paper, with timm's model contract.

    Every constructor argument is plain data (str / int / float / bool) and is kept in `self.config`,
    so a weights file can always rebuild the exact network (see `mobilenetv3.save_model`).

    Args:
        arch: "large", "small", "large_minimal" or "small_minimal" (Tables 1 and 2, and the minimalistic rows).
        num_classes: classifier outputs; 0 keeps the pooled 1280/1024 features (no classifier).
        in_chans: input channels.
        width_mult: the paper's width multiplier.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic-depth rate, scaled linearly with block depth (block i of n gets rate * i / n,
            as in timm); only residual blocks use it.
        norm_layer: "batchnorm", "syncbatchnorm", or a callable taking the channel count.
        bn_eps, bn_momentum: BatchNorm settings (PyTorch momentum convention); the TF reference uses 1e-3 / 0.01.
        output_stride: 32, 16 or 8; strides past it become dilation (for dense prediction).
        stem_stride: 2 as in the paper; 1 keeps full resolution for tiny inputs (28x28 Fashion-MNIST).
        expansion_rule, fix_stem, scale_head, head_bias, se_round_to_divisor, padding: layout rules that
            express the peers' variants exactly (see `spec.LayoutOptions`); the defaults are the paper's.
        block_repeats, se_activation_from_block, first_block_residual: further layout rules for timm's
            mobilenetv3_large_150d (depth multiplier) and mobilenetv3_rw (see `spec.LayoutOptions`).
        reduced_tail: halve the last stage's channels (the paper's §6.1 for segmentation and detection;
            `spec.halve_tail`).
        dilate_strided_block: past `output_stride`, dilate the block whose stride was removed too
            (torchvision's `dilated=True`); by default it keeps the previous dilation (TF, timm).
        final_conv_repeats: how many 1x1 convs end the features (timm's depth multiplier makes 2).
        zero_init_last: start every residual block's last BN at zero scale, so that each block begins as the
            identity (Goyal et al. 2017; timm's ResNet `zero_init_last`, torchvision's `zero_init_residual`).
            Initialisation only: the layout and the state dict keys are unchanged.
    """

    def __init__(
        self,
        arch: str = "large",
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        norm_layer: str | Callable[..., nn.Module] | None = "batchnorm",
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        output_stride: int = 32,
        stem_stride: int = 2,
        expansion_rule: str = ExpansionRule.FROM_ROUNDED_INPUT.value,
        fix_stem: bool = False,
        scale_head: bool = False,
        head_bias: bool = True,
        se_round_to_divisor: bool = True,
        padding: str = Padding.SYMMETRIC.value,
        block_repeats: list[int] | None = None,
        se_activation_from_block: bool = False,
        first_block_residual: bool = True,
        final_conv_repeats: int = 1,
        zero_init_last: bool = False,
        reduced_tail: bool = False,
        dilate_strided_block: bool = False,
    ) -> None:
        super().__init__()
        config = dict(locals())
        for key in ("self", "__class__"):
            config.pop(key, None)
        _check_arguments(config)
        if not callable(norm_layer):
            config["norm_layer"] = norm_layer or "batchnorm"
        if block_repeats is not None:
            config["block_repeats"] = [int(n) for n in block_repeats]
        self.config = config
        # What the registry, weights and loaders record about this network (None until one does): its
        # registered name, the preprocessing its weights expect, and its class names.
        self.model_name: str | None = None
        self.preprocessing: Preprocessing | None = None
        self.class_names: list[str] | None = None
        self.spec: NetworkSpec = NETWORK_SPECS[arch]
        options = _layout(config)
        self.network = network = resolve(self.spec, options)
        norm = _norm_factory(norm_layer, bn_eps, bn_momentum)
        self.num_classes = num_classes
        self.drop_rate = drop_rate

        self.stem = ConvNormAct(
            in_chans, network.stem_channels, 3, stride=stem_stride, norm_layer=norm,
            activation=self.spec.stem_activation, padding=options.padding,
        )

        blocks, reductions = _make_blocks(network, norm, options.padding, stem_stride=stem_stride,
                                          output_stride=output_stride, drop_path_rate=drop_path_rate,
                                          dilate_strided_block=dilate_strided_block)
        self.blocks = nn.Sequential(*blocks)
        stride_so_far = reductions[-1]
        num_blocks = len(network.blocks)
        final_convs = [
            ConvNormAct(
                network.blocks[-1].out_channels if index == 0 else network.final_conv_channels,
                network.final_conv_channels, 1, norm_layer=norm, activation=self.spec.final_conv_activation,
            )
            for index in range(final_conv_repeats)
        ]
        # timm's depth multiplier also repeats the last 1x1 conv (mobilenetv3_large_150d has two).
        self.final_conv = final_convs[0] if final_conv_repeats == 1 else nn.Sequential(*final_convs)
        reductions.append(stride_so_far)
        self.num_features = network.final_conv_channels
        self.head_hidden_size = network.head_channels

        names = ["stem"] + [f"blocks.{i}" for i in range(num_blocks)] + ["final_conv"]
        channels = [network.stem_channels] + [b.out_channels for b in network.blocks] + [self.num_features]
        # every layer of [stem, *blocks, final_conv]; feature_info is the last layer at each resolution
        self.layer_info = FeatureInfo(
            dict(num_chs=channels[i], reduction=reductions[i], module=names[i]) for i in range(len(names))
        )
        self.feature_layer_ids = _feature_taps(network, stem_stride)
        self.feature_info = FeatureInfo(
            dict(self.layer_info[i], index=n) for n, i in enumerate(self.feature_layer_ids)
        )

        # The "efficient last stage" (paper, figure 5): pool first, then a 1x1 conv without BN.
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = make_conv(self.num_features, self.head_hidden_size, 1, bias=options.head_bias)
        self.head_act = make_activation(self.spec.head_activation)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier: nn.Module = (
            nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        )
        init_weights(self)
        if zero_init_last:
            for block in self.blocks:
                if block.has_skip:
                    if getattr(block.project.bn, "weight", None) is None:
                        raise UserError("zero_init_last needs a norm layer with a learnable scale (affine)")
                    nn.init.zeros_(block.project.bn.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled feature map of the last 1x1 conv (960 / 576 channels at width 1.0), in `x`'s layout."""
        if torch.jit.is_scripting():
            return self._features(x)
        inside = cpu_routes.inference_layout(x)  # NHWC in eager CPU inference; the caller gets its layout back
        features = self._features(inside)
        return features if inside is x else features.contiguous()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.conv_head(x)
        x = self.flatten(self.head_act(x))
        if pre_logits:
            return x
        return self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            x = cpu_routes.inference_layout(x)  # NHWC in eager CPU inference; the pooled logits do not care
        return self.forward_head(self._features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one (0 removes it), on the head's device and dtype.

        `global_pool` is accepted for timm compatibility; only average pooling ("avg") is part of the paper's head.
        """
        if global_pool not in (None, "avg"):
            raise UserError(f"MobileNetV3's efficient head pools by averaging; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        weight = self.conv_head.weight
        if num_classes > 0:
            self.classifier = nn.Linear(self.head_hidden_size, num_classes, device=weight.device, dtype=weight.dtype)
            init_weights(self.classifier)
        else:
            self.classifier = nn.Identity()


class MobileNetV3Features(nn.Module):
    """Backbone for dense prediction: returns the feature maps at `out_indices` of `feature_info`.

    Module names match `MobileNetV3`, so a classifier's state dict loads into it with
    `load_state_dict(state_dict, strict=False)` (the head keys are reported as unexpected and not used);
    layers after the deepest requested feature are dropped.

    `layer_ids` instead taps any layers of [stem, *blocks, final_conv] (`model.layer_info`), e.g. the first
    block at a stride rather than the last (what torchvision's LR-ASPP takes as its low-level features);
    `out_indices` is then None.
    """

    def __init__(self, model: MobileNetV3, out_indices: tuple[int, ...] | list[int] | None = None, *,
                 layer_ids: tuple[int, ...] | list[int] | None = None) -> None:
        super().__init__()
        all_info = model.feature_info
        if layer_ids is not None:
            if out_indices is not None:
                raise UserError("pass out_indices or layer_ids, not both")
            bad = [i for i in layer_ids if not 0 <= i < len(model.layer_info)]
            if bad:
                raise UserError(f"layer_ids {bad} out of range: this model has {len(model.layer_info)} layers")
            layer_ids = sorted(set(layer_ids))
            self._setup(model, None, FeatureInfo(dict(model.layer_info[i], index=n) for n, i in enumerate(layer_ids)),
                        layer_ids)
            return
        if out_indices is None:
            out_indices = tuple(range(len(all_info)))
        bad = [i for i in out_indices if not -len(all_info) <= i < len(all_info)]
        if bad:
            raise UserError(f"out_indices {bad} out of range: this model has {len(all_info)} feature levels")
        out_indices = sorted({i % len(all_info) for i in out_indices})
        self._setup(model, out_indices, FeatureInfo(dict(all_info[i]) for i in out_indices),
                    [model.feature_layer_ids[i] for i in out_indices])

    def _setup(self, model: MobileNetV3, out_indices: list[int] | None, feature_info: FeatureInfo,
               layer_ids: list[int]) -> None:
        self.config = dict(model.config)
        self.model_name: str | None = model.model_name
        self.preprocessing: Preprocessing | None = model.preprocessing
        self.class_names: list[str] | None = model.class_names
        self.feature_info = feature_info
        self.out_indices = out_indices
        self.taps = layer_ids
        last = max(layer_ids)
        num_blocks = len(model.blocks)
        self.stem = model.stem
        self.blocks = nn.Sequential(*list(model.blocks)[: min(last, num_blocks)])
        self.final_conv = model.final_conv if last == num_blocks + 1 else nn.Identity()
        self.use_final_conv = last == num_blocks + 1

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if torch.jit.is_scripting():
            return self._forward(x)
        inside = cpu_routes.inference_layout(x)  # NHWC in eager CPU inference; the caller gets its layout back
        features = self._forward(inside)
        return features if inside is x else [feature.contiguous() for feature in features]

    def _forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features: List[torch.Tensor] = []
        x = self.stem(x)
        if 0 in self.taps:
            features.append(x)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index + 1 in self.taps:
                features.append(x)
        if self.use_final_conv:
            features.append(self.final_conv(x))
        return features


def init_weights(module: nn.Module) -> None:
    """torchvision's initialisation: He (fan-out) convs, unit BN, N(0, 0.01) linear, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
