"""The few layers MobileNetV3 is made of: conv+norm+act, squeeze-excite, and the bneck block."""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.modules import module as _module_globals  # the global forward-hook registries

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
    symmetric = dilation * (kernel_size - 1) // 2
    # 'SAME' equals symmetric padding whenever the stride is 1 and the kernel extent is odd; only
    # then can the padding be static.  Otherwise it depends on the input size.
    if padding is Padding.SAME and (stride > 1 or (dilation * (kernel_size - 1)) % 2 == 1):
        return SamePadConv2d(
            in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups, bias=bias
        )
    return nn.Conv2d(
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
        if torch.jit.is_scripting():
            x = self.bn(self.conv(x))
        else:
            conv_out = call_conv(self.conv, x)
            normalised = _inference_batchnorm(self.bn, conv_out, self.conv, x)
            x = self.bn(conv_out) if normalised is None else normalised
        return self.act(x) if self.has_act else x


@torch.jit.unused  # TorchScript keeps the caller's memory format
def runs_channels_last(x: torch.Tensor) -> bool:
    """Whether eager inference should move `x` (an NCHW image batch) to channels_last before the network.

    On the CPU, oneDNN computes convolutions in NHWC; handed NCHW it reorders every layer's input and output.
    The caller's layout is irrelevant to the logits, so eager CPU inference (autograd off) converts once at
    the stem: measured 2x faster at batch 32 and ~20% at batch 1 for Large (`benchmarks/eager_speed.py`).
    Training keeps the caller's layout (`train --channels-last` chooses), as do CUDA, tracers and compilers.
    """
    return (
        _plain_eager(x)
        and x.dim() == 4
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        # (N, 1, H, W) counts as channels_last-contiguous either way; its stride(1) says which layout it has
        and not (x.is_contiguous(memory_format=torch.channels_last) and (x.stride(1) == 1 or x.shape[1] != 1))
    )


@torch.jit.unused
def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` in NHWC strides, also with one channel (where `.contiguous(channels_last)` keeps NCHW strides)."""
    if x.shape[1] == 1:
        return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    return x.contiguous(memory_format=torch.channels_last)


def _plain_eager(x: torch.Tensor) -> bool:
    """Whether `x` is a real tensor in plain eager execution, where the inference fast paths may apply: not a
    torch.fx Proxy, not under torch.jit.trace or torch.compile (tracers must see the plain modules), and no
    vmap / grad / jvp transform or forward-mode AD running (they need the plain out-of-place ops)."""
    return (
        isinstance(x, torch.Tensor)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        # no forward-AD dual level open (`torch._C._is_fwd_grad_enabled()` is not this test: it is true
        # everywhere outside inference_mode, torch.no_grad() included)
        and getattr(forward_ad, "_current_level", 0) < 0  # if torch renames it: the plain path
    )


@torch.jit.unused  # TorchScript calls the module
def call_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, or the same convolution by a faster route where one was measured faster: during eager CPU
    training, overhanging depthwise kernels on explicitly padded maps and 1x1 convs on small maps as a GEMM."""
    out = _padded_depthwise_conv(conv, x)
    if out is None:
        out = _pointwise_conv_as_matmul(conv, x)
    return conv(x) if out is None else out


#: 1x1 convs on maps of at most this many pixels run as a GEMM during CPU training (`_pointwise_conv_as_matmul`).
MATMUL_POINTWISE_MAX_PIXELS = 16


@torch.jit.unused
def _pointwise_conv_as_matmul(conv: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A 1x1 conv on a small channels_last map as one matrix product (`F.linear` on the (N*H*W, C) view of
    the NHWC data) during CPU training; None when `conv` must be called as usual.

    A 1x1 convolution with stride 1 and no padding is that GEMM, and on NHWC data both the input and the
    output are views, so nothing is copied.  On CPUs without AVX-512, oneDNN 3.12 (torch 2.14) was slower at
    the forward + backward of such convs on small maps (`benchmarks/small_conv_speed.py`, Large 1.25 at 28x28,
    batch 128, one thread): 1.6-3.1x on the 1x1 maps of squeeze-excite and the head (10-12 GMAC/s against
    28-34 for the larger ones), 1.4-1.7x on 2x2 and 1.1-1.2x on 4x4 maps.  On 7x7 the GEMM led by only
    1.06-1.15x, and on 14x14 and 28x28 it was slower.  Same conditions as `_padded_depthwise_conv`: float32,
    autograd on, autocast off, eager mode, a plain `nn.Conv2d` without hooks, on a CPU whose kernels are not
    AVX-512 ones; and a module in training mode (an eval-mode model under autograd, as tracers and saliency
    tools run it, keeps the conv).  `benchmarks/train_step_speed.py` measures the training step with and without.
    """
    if (  # the cheap tests first: this runs for every conv of every forward
        type(conv) is not nn.Conv2d
        or conv.kernel_size != (1, 1)
        or conv.groups != 1
        or not conv.training
        or conv.stride != (1, 1)
        or conv.padding != (0, 0)  # also rejects the "same"/"valid" strings
        or not _cpu_training_route_input(x)
        or x.shape[-2] * x.shape[-1] > MATMUL_POINTWISE_MAX_PIXELS
        or _has_hooks_or_patched_forward(conv)
    ):
        return None
    n, channels, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, channels)  # a view: x is NHWC in memory
    out = F.linear(rows, conv.weight.view(conv.out_channels, channels), conv.bias)
    return out.view(n, h, w, conv.out_channels).permute(0, 3, 1, 2)  # NCHW shape, NHWC strides, as conv gives


@torch.jit.unused  # TorchScript takes the plain `self.conv(x)` branch
def _padded_depthwise_conv(conv: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A depthwise conv whose kernel is larger than its input map, as explicit zero padding then an unpadded
    conv, during CPU training; None when `conv` must be called as usual.

    Small inputs (Fashion-MNIST's 28x28 with stem stride 1, CIFAR's 32x32) leave the last stages with 2x2 and
    4x4 maps under 5x5 depthwise kernels.  On CPUs without AVX-512, oneDNN 3.12 (torch 2.14) has no JIT
    kernel for the weight gradient of such a padded depthwise conv and falls back to im2col + GEMM: measured
    at batch 128, channels_last, one thread, that layer's forward + backward took 3-6x (5x5) and 18-32x
    (3x3) longer than the same conv applied to a pre-padded input, which takes oneDNN's JIT kernels.  The
    result is the same convolution (zero padding is zero padding).  Where the kernel fits in the map, or in
    NCHW, or with dilation, the pre-padded form was slower, so it is used only where it was measured faster:
    an overhanging kernel on a float32 channels_last input with autograd on and autocast off, on a CPU whose
    ATen kernels are not AVX-512 ones (no AVX-512 machine could be measured).  Eager mode only (tracers and
    compilers see the plain module), for a plain depthwise `nn.Conv2d` with zero padding and no hooks or
    patched `forward` (such a conv is called as a module, so they run).  One with at most
    `TAPS_DEPTHWISE_MAX_OUTPUT_PIXELS` output pixels skips the padding altogether: `_DepthwiseByTaps` computes
    only the taps that land on the map.  `benchmarks/train_step_speed.py` measures the training step with and
    without.
    """
    if (  # the cheap tests first: this runs for every conv of every forward
        type(conv) is not nn.Conv2d
        or conv.groups == 1
        or conv.groups != conv.in_channels
        or conv.groups != conv.out_channels
        or conv.padding_mode != "zeros"
        or conv.dilation != (1, 1)
        or not isinstance(conv.padding, tuple)  # "same"/"valid" strings
        or conv.padding == (0, 0)
        or not _cpu_training_route_input(x)
        or (x.shape[-2] >= conv.kernel_size[0] and x.shape[-1] >= conv.kernel_size[1])
        or _has_hooks_or_patched_forward(conv)
    ):
        return None
    pad_h, pad_w = conv.padding
    out_h = (x.shape[-2] + 2 * pad_h - conv.kernel_size[0]) // conv.stride[0] + 1
    out_w = (x.shape[-1] + 2 * pad_w - conv.kernel_size[1]) // conv.stride[1] + 1
    if out_h * out_w <= TAPS_DEPTHWISE_MAX_OUTPUT_PIXELS:
        out = _DepthwiseByTaps.apply(x, conv.weight, conv.stride, conv.padding)
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)
    return F.conv2d(F.pad(x, [pad_w, pad_w, pad_h, pad_h]), conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)


#: Depthwise convs (of `_padded_depthwise_conv`'s kind) with at most this many output pixels run as `_DepthwiseByTaps`.
TAPS_DEPTHWISE_MAX_OUTPUT_PIXELS = 4


@functools.cache
def _depthwise_taps(
    size: tuple[int, int], kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[int, int, list[tuple[int, int, int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (output pixel, input pixel, kernel tap) triples of a zero-padded depthwise conv whose tap lands on
    the map, as a list and as three index tensors, with the output height and width."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = size, kernel_size, stride, padding
    out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    triples = [
        (oy * out_w + ox, iy * w + ix, ky * kw + kx)
        for oy in range(out_h) for ox in range(out_w) for ky in range(kh) for kx in range(kw)
        for iy, ix in [(oy * sh - ph + ky, ox * sw - pw + kx)]
        if 0 <= iy < h and 0 <= ix < w
    ]
    out_pixels, in_pixels, taps = (torch.tensor(column) for column in zip(*triples))
    return out_h, out_w, triples, out_pixels, in_pixels, taps


class _DepthwiseByTaps(torch.autograd.Function):
    """A depthwise conv on a tiny channels_last map as one multiply-add over (batch, channels) per kernel tap
    that lands on the map, forward and backward.

    With a 5x5 kernel on a 2x2 output (the last stage of a 28x28 input at stem stride 1), 21 of every 25 taps
    of even the pre-padded conv multiply padding; oneDNN's kernels still run them, and on AVX2 its weight
    gradient there is slow.  Here every tap on the map is one `addcmul_` over a contiguous (N, C) slice of
    the NHWC data (C innermost, so vectorised), and the weight gradient one gathered product summed over the
    batch.  Forward + backward at batch 128, one thread (`benchmarks/small_conv_speed.py`): 1200 channels
    2x2 -> 2x2, 9.8 ms against 36.1 pre-padded and 102.8 plain; 864 channels 4x4 -> 2x2 at stride 2, 19.6
    against 28.2 and 154.3.  The Python loop grows with the taps on the map, so `TAPS_DEPTHWISE_MAX_OUTPUT_PIXELS`
    keeps it to outputs of the size measured.  The backward is made of differentiable ops, so double backward
    works (slowly).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
        stride: tuple[int, int], padding: tuple[int, int],
    ) -> torch.Tensor:
        n, channels, h, w = x.shape
        out_h, out_w, triples, _, _, _ = _depthwise_taps((h, w), tuple(weight.shape[-2:]), stride, padding)
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, channels)  # a view: x is NHWC in memory
        tap_weights = weight.reshape(channels, -1).t().contiguous()  # (taps, C)
        out = x.new_zeros(n, out_h * out_w, channels)
        for out_pixel, in_pixel, tap in triples:
            out[:, out_pixel].addcmul_(rows[:, in_pixel], tap_weights[tap])
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding)  # type: ignore[attr-defined]
        return out.view(n, out_h, out_w, channels).permute(0, 3, 1, 2)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None, None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        stride, padding = ctx.geometry  # type: ignore[attr-defined]
        n, channels, h, w = x.shape
        out_h, out_w, triples, out_pixels, in_pixels, taps = _depthwise_taps(
            (h, w), tuple(weight.shape[-2:]), stride, padding
        )
        grad_rows = to_channels_last(grad).permute(0, 2, 3, 1).reshape(n, out_h * out_w, channels)
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, channels)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            tap_weights = weight.reshape(channels, -1).t().contiguous()
            grad_x_rows = x.new_zeros(n, h * w, channels)
            for out_pixel, in_pixel, tap in triples:
                grad_x_rows[:, in_pixel].addcmul_(grad_rows[:, out_pixel], tap_weights[tap])
            grad_x = grad_x_rows.view(n, h, w, channels).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            per_triple = (grad_rows[:, out_pixels] * rows[:, in_pixels]).sum(0)  # (triples, C)
            grad_taps = weight.new_zeros(weight.shape[-2] * weight.shape[-1], channels).index_add_(0, taps, per_triple)
            grad_weight = grad_taps.t().reshape(weight.shape)
        return grad_x, grad_weight, None, None


@torch.jit.unused
def _cpu_training_route_input(x: torch.Tensor) -> bool:
    """Whether a conv input may take one of `call_conv`'s training routes (those were measured only there): a
    real float32 NHWC batch on a CPU without AVX-512 kernels, autograd on, autocast off, in plain eager mode."""
    return (
        torch.is_grad_enabled()
        and isinstance(x, torch.Tensor)  # not a torch.fx Proxy: the traced graph gets the plain module
        and x.device.type == "cpu"
        and _plain_eager(x)  # before any test of x's shape: a tracer would guard on it
        and x.dim() == 4
        and x.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_autocast_enabled("cpu")
        and not _avx512_kernels()
    )


@functools.cache
def _avx512_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _has_hooks_or_patched_forward(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks, forward or backward, its own or global ones, or an instance-level
    `forward` (as hook libraries install): then it must be called as a module."""
    return bool(
        _has_forward_hooks(module) or module._backward_hooks or module._backward_pre_hooks
        or _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks
        or "forward" in module.__dict__
    )


#: Feature maps at least this large (elements) get BatchNorm inference in place; smaller ones get a new tensor
#: (a cheap allocation from the heap), so a caller's small tensor is never overwritten for nothing.
INPLACE_BATCHNORM_MIN_ELEMENTS = 1 << 18


def _has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (its own or global ones, e.g. profilers and FLOP counters)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _module_globals._global_forward_hooks
                or _module_globals._global_forward_pre_hooks)


@torch.jit.unused
def _owns_output(conv: nn.Module, conv_input: torch.Tensor, conv_output: torch.Tensor) -> bool:
    """Whether `conv_output` may be overwritten: a fresh tensor (not the input or a view of it, as a
    replaced conv such as nn.Identity would return) that no forward hook of `conv` has been handed."""
    return (
        isinstance(conv_output, torch.Tensor)
        and not _has_forward_hooks(conv)
        and conv_output.untyped_storage().data_ptr() != conv_input.untyped_storage().data_ptr()
    )


@torch.jit.unused  # TorchScript takes the plain `self.bn(self.conv(x))` branch
def _inference_batchnorm(
    norm: nn.Module, x: torch.Tensor, conv: nn.Module, conv_input: torch.Tensor
) -> Optional[torch.Tensor]:
    """Eval-mode BatchNorm2d of a conv output `x` by ATen's kernel directly; None when `norm` must be called.

    `nn.BatchNorm2d` writes its output to a new tensor.  At batch 32 those are tens of MB each, and glibc
    hands blocks that large back to the kernel when freed, so a fresh one per layer means page faults on
    every layer of every call.  A conv output is ours to overwrite, so on large maps ATen's own BatchNorm
    kernel (`native_batch_norm.out`, the one `F.batch_norm` calls) writes into its input: each element is
    read before it is written, and the result is bit-identical.  `x` must be `conv(conv_input)` and ours to
    overwrite (see `_owns_output`: a hooked conv's output is left alone).  Otherwise, and on small maps (batch 1), it goes to
    `torch.batch_norm` straight away, skipping the module's Python bookkeeping, which costs more than the
    kernel there.  Only on the CPU (CUDA's caching allocator makes allocation cheap), on a 4-D batch, with
    autograd, forward-mode AD and functorch transforms off, in eager mode (tracers and compilers see the plain
    module), for a plain `nn.BatchNorm2d` with running statistics and no forward hooks (a hooked BN is called
    as a module, so its hooks run).
    """
    if (  # the cheap tests first: this runs for every BN of every forward
        not isinstance(x, torch.Tensor)  # a torch.fx Proxy: the traced graph gets the plain module
        or norm.training
        or type(norm) is not nn.BatchNorm2d
        or torch.is_grad_enabled()
        or x.dim() != 4  # nn.BatchNorm2d rejects an unbatched map; torch.batch_norm would misread it
        or x.device.type != "cpu"
        or norm.running_mean is None
        or norm.running_var is None
        or x.dtype != norm.running_var.dtype
        or _has_forward_hooks(norm)
        or not _plain_eager(x)
    ):
        return None
    if x.numel() < INPLACE_BATCHNORM_MIN_ELEMENTS or not _owns_output(conv, conv_input, x):
        return torch.batch_norm(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, False, 0.0,
                                norm.eps, False)
    torch.ops.aten.native_batch_norm.out(
        x, norm.weight, norm.bias, norm.running_mean, norm.running_var, False, 0.0, norm.eps,
        out=x, save_mean=x.new_empty(0), save_invstd=x.new_empty(0),
    )
    return x


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite with a ReLU inside and the hard-sigmoid gate relu6(x + 3) / 6 (paper, section 5.3).

    `activation` replaces the inner ReLU (timm's mobilenetv3_rw uses the block's own activation).
    """

    def __init__(
        self, channels: int, squeeze_channels: int, activation: Activation = Activation.RELU, inplace: bool = False
    ) -> None:
        super().__init__()
        #: Scale the input in place when autograd is off (the bneck block owns its input; a stand-alone
        #: layer must not overwrite the caller's tensor, hence off by default).
        self.inplace = inplace
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = make_activation(activation)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        if torch.jit.is_scripting():
            scale = self.gate(self.fc2(self.act(self.fc1(scale))))
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
            return x.mul_(scale) if self.inplace and not needs_grad else x * scale
        scale = self.gate(call_conv(self.fc2, self.act(call_conv(self.fc1, scale))))
        if self.inplace and _may_overwrite(x, scale):
            return x.mul_(scale)  # same product, one feature map fewer to allocate
        return x * scale


@torch.jit.unused  # TorchScript decides in SqueezeExcite.forward
def _may_overwrite(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether eager code may write into `x`: not while autograd records it, and never while a tracer
    (torch.fx, which hands us Proxies, torch.jit.trace, torch.compile) is building a graph."""
    if not _plain_eager(x):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad))


@torch.jit.unused  # TorchScript runs no hooks
def _output_handed_out(layer: ConvNormAct) -> bool:
    """Whether a forward hook (of `layer`, its BN, its in-place activation, or a global one) may hold `layer`'s
    output, which the in-place squeeze-excite product would otherwise overwrite in inference."""
    return _has_forward_hooks(layer) or _has_forward_hooks(layer.bn) or _has_forward_hooks(layer.act)


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
            SqueezeExcite(expanded_channels, squeeze_channels, se_activation, inplace=True)
            if squeeze_channels is not None else nn.Identity()
        )
        self.project = ConvNormAct(expanded_channels, out_channels, 1, norm_layer=norm_layer, activation=None)
        # Stochastic depth only makes sense on a residual path.
        self.has_drop_path = self.has_skip and drop_path_rate > 0
        if self.has_drop_path:
            from torchvision.ops import StochasticDepth  # imported on use: torchvision costs ~1 s to import

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
            if not torch.jit.is_scripting():  # TorchScript runs no hooks
                if (_output_handed_out(self.depthwise) and isinstance(out, torch.Tensor)  # not a torch.fx Proxy
                        and not (torch.is_grad_enabled() and out.requires_grad)):
                    out = out.clone()  # a hook may hold the depthwise output: the SE product must not overwrite it
            out = self.se(out)
        out = self.project(out)
        if self.has_skip:
            if self.has_drop_path:
                out = self.drop_path(out)
            out += x  # in place: `out` is a fresh BN/conv output that backward does not need
        return out
