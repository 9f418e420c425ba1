"""The few layers MobileNetV3 is made of: conv+norm+act, squeeze-excite, and the bneck block.

Each forward is the paper's dataflow.  Where eager CPU PyTorch has a faster way to compute a step, the forward
makes one call into `mobilenetv3.cpu_routes`, which holds those routes, their guards and their switch
(`docs/performance.md`); the convs that a training route may take are built by `make_conv` as
`cpu_routes.RoutedConv2d`, an `nn.Conv2d` with the same parameters and state-dict keys.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_routes
from .spec import Activation, Padding

NormLayer = Callable[[int], nn.Module]


def make_activation(activation: Activation, inplace: bool = True) -> nn.Module:
    # nn.Hardswish is x * relu6(x + 3) / 6, exactly the paper's h-swish (eq. 2).  In place by default
    # (as in timm and torchvision): every activation follows a freshly allocated conv/BN output, and
    # not allocating a second feature map per layer is a large part of eager CPU speed at batch 32.
    if activation is Activation.HARD_SWISH:
        return nn.Hardswish(inplace=inplace)
    return nn.ReLU(inplace=inplace)


def _same_pad_amount(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding computed from the input size (for TF-trained weights).

    When the stride does not divide the input, TF pads one more pixel at the bottom/right than at the
    top/left; symmetric PyTorch padding would shift the sampling grid and change every output.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2], x.shape[-1]
        pad_h = _same_pad_amount(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_pad_amount(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
    padding: Padding = Padding.SYMMETRIC,
) -> nn.Conv2d:
    """A conv with the padding rule of `padding`: an `nn.Conv2d`, a `cpu_routes.RoutedConv2d` where a CPU training
    route may apply (1x1 and depthwise convs), or a `SamePadConv2d` where TF's 'SAME' padding is asymmetric."""
    symmetric = dilation * (kernel_size - 1) // 2
    # 'SAME' equals symmetric padding whenever the stride is 1 and the kernel extent is odd; only
    # then can the padding be static.  Otherwise it depends on the input size.
    if padding is Padding.SAME and (stride > 1 or (dilation * (kernel_size - 1)) % 2 == 1):
        return SamePadConv2d(
            in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups, bias=bias
        )
    routable = cpu_routes.routable(kernel_size, stride=stride, dilation=dilation, groups=groups,
                                   in_channels=in_channels, out_channels=out_channels, padding=symmetric)
    return (cpu_routes.RoutedConv2d if routable else nn.Conv2d)(
        in_channels, out_channels, kernel_size, stride=stride, padding=symmetric, dilation=dilation,
        groups=groups, bias=bias,
    )


class ConvNormAct(nn.Module):
    """conv -> norm -> activation (the activation may be absent, as in the linear bottleneck)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        norm_layer: NormLayer,
        activation: Activation | None,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding: Padding = Padding.SYMMETRIC,
    ) -> None:
        super().__init__()
        self.conv = make_conv(
            in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups, padding=padding
        )
        self.bn = norm_layer(out_channels)
        self.act = make_activation(activation) if activation is not None else nn.Identity()
        self.has_act = activation is not None  # forward skips the Identity call (eager overhead at batch 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if torch.jit.is_scripting():
            out = self.bn(out)
        else:  # the same BN, in place on large maps in eager CPU inference
            out = cpu_routes.batch_norm(self.bn, out, self.conv, x)
        return self.act(out) if self.has_act else out


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite with a ReLU inside and the hard-sigmoid gate relu6(x + 3) / 6 (paper, section 5.3).

    `activation` replaces the inner ReLU (timm's mobilenetv3_rw uses the block's own activation).
    """

    def __init__(self, channels: int, squeeze_channels: int, activation: Activation = Activation.RELU) -> None:
        super().__init__()
        self.fc1 = make_conv(channels, squeeze_channels, 1, bias=True)
        self.act = make_activation(activation)
        self.fc2 = make_conv(squeeze_channels, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    """The "bneck" block: 1x1 expand -> depthwise -> SE -> 1x1 linear projection, with a residual.

    The expansion is skipped when it would not widen the input (the first row of both tables), as in the
    TF reference and both peers.
    """

    def __init__(
        self,
        in_channels: int,
        expanded_channels: int,
        out_channels: int,
        *,
        kernel_size: int,
        stride: int,
        dilation: int,
        squeeze_channels: int | None,
        activation: Activation,
        norm_layer: NormLayer,
        padding: Padding,
        drop_path_rate: float = 0.0,
        se_activation: Activation = Activation.RELU,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.has_skip = residual and stride == 1 and in_channels == out_channels
        if expanded_channels != in_channels:
            self.expand: nn.Module = ConvNormAct(
                in_channels, expanded_channels, 1, norm_layer=norm_layer, activation=activation
            )
        else:
            self.expand = nn.Identity()
        self.depthwise = ConvNormAct(
            expanded_channels,
            expanded_channels,
            kernel_size,
            stride=stride,
            dilation=dilation,
            groups=expanded_channels,
            norm_layer=norm_layer,
            activation=activation,
            padding=padding,
        )
        self.se: nn.Module = (
            SqueezeExcite(expanded_channels, squeeze_channels, se_activation)
            if squeeze_channels is not None else nn.Identity()
        )
        self.project = ConvNormAct(expanded_channels, out_channels, 1, norm_layer=norm_layer, activation=None)
        # Stochastic depth only makes sense on a residual path.
        self.has_drop_path = self.has_skip and drop_path_rate > 0
        if self.has_drop_path:
            from torchvision.ops import StochasticDepth  # imported on use: keeps torchvision (slow to import) off start-up

            self.drop_path: nn.Module = StochasticDepth(drop_path_rate, "row")
        else:
            self.drop_path = nn.Identity()
        # Identity modules stay (module names are the contract) but forward does not call them.
        self.has_expand = expanded_channels != in_channels
        self.has_se = squeeze_channels is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.has_expand else x
        out = self.depthwise(out)
        if self.has_se:
            out = self.se(out)
        out = self.project(out)
        if self.has_skip:
            if self.has_drop_path:
                out = self.drop_path(out)
            out += x  # in place: `out` is a fresh BN/conv output that backward does not need
        return out
