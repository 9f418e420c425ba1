"""CPU execution routes: faster ways to compute the same layers in eager PyTorch on the CPU, behind one switch.

`models/layers.py` is the paper's network; this module is how eager CPU PyTorch runs some of it faster.  Each
route computes the same function as the plain module (bit-identical, or the same arithmetic in another summation
order where a test bounds the difference), applies only where it was measured faster, and stays off under
autograd transforms, tracers and compilers, which must see the plain modules.  `docs/performance.md` says why
each exists, when it applies and which benchmark measures it:

- ``channels_last``: eager CPU inference converts an NCHW batch to NHWC once at the stem (`inference_layout`).
- ``inplace_batchnorm``: eval-mode BatchNorm in CPU inference writes into the conv output it normalises
  (`batch_norm`; `may_overwrite` is the rule for when a tensor may be overwritten).
- ``padded_depthwise`` and ``depthwise_taps``: in CPU training, depthwise kernels larger than their map run on an
  explicitly padded map, or tap by tap on tiny outputs (`RoutedConv2d`).
- ``pointwise_gemm``: in CPU training, 1x1 convs on small maps run as one matrix product (`RoutedConv2d`).

The switch: `set_routes(enabled=False)` turns every route off (`set_routes(pointwise_gemm=False)` one of them),
`with routes(enabled=False): ...` does so for a block of code, and `settings()` says what is on.  The environment
variable ``MOBILENETV3_CPU_ROUTES`` sets the start value, read once on import: ``0`` turns every route off, ``1``
(or unset) leaves them on, and a comma-separated list of route names keeps only those on.

The guards here (`_plain_eager`, `_global_forward_hooks`, `may_overwrite`) are the only code in the package that
reads torch's private state: the global hook registries, a module's hook dicts, the functorch and forward-AD state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.modules import module as _module_globals  # the global forward-hook registries

from .errors import UserError

__all__ = [
    "ROUTES", "RouteSettings", "RoutedConv2d", "batch_norm", "conv_route", "depthwise_by_taps", "from_environment",
    "inference_layout", "may_overwrite", "restore", "routable", "routes", "set_routes", "settings", "to_channels_last",
    "training_routes_on_this_cpu",
]

#: The routes by name, as `set_routes` and MOBILENETV3_CPU_ROUTES spell them.
ROUTES = ("channels_last", "inplace_batchnorm", "padded_depthwise", "depthwise_taps", "pointwise_gemm")
ENV_VAR = "MOBILENETV3_CPU_ROUTES"


@dataclasses.dataclass(frozen=True)
class RouteSettings:
    """Which routes are on, and the size bounds of the training routes (the sizes they were measured faster at)."""

    channels_last: bool = True
    inplace_batchnorm: bool = True
    padded_depthwise: bool = True
    depthwise_taps: bool = True
    pointwise_gemm: bool = True
    #: also use the training routes on a CPU whose ATen kernels are AVX-512 ones (none could be measured)
    on_avx512: bool = False
    #: BatchNorm runs in place on feature maps of at least this many elements; smaller ones are cheap to
    #: allocate and get the module's new tensor.
    inplace_batchnorm_min_elements: int = 1 << 18
    #: 1x1 convs on maps of at most this many pixels run as a GEMM (`benchmarks/small_conv_speed.py`).
    pointwise_gemm_max_pixels: int = 16
    #: depthwise convs with at most this many output pixels run tap by tap (`benchmarks/small_conv_speed.py`).
    depthwise_taps_max_pixels: int = 4


def from_environment(value: Optional[str] = None) -> RouteSettings:
    """The settings that MOBILENETV3_CPU_ROUTES=`value` (by default, the variable's value now) asks for."""
    value = (os.environ.get(ENV_VAR, "") if value is None else value).strip().lower()
    if value in ("", "1", "on", "true", "yes"):
        return RouteSettings()
    if value in ("0", "off", "false", "no"):
        return RouteSettings(**{name: False for name in ROUTES})
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = sorted(names - set(ROUTES))
    if unknown:
        raise UserError(f"{ENV_VAR}={value!r}: unknown route {', '.join(unknown)}; use 0, 1 or a comma-separated "
                        f"list of {', '.join(ROUTES)}")
    return RouteSettings(**{name: name in names for name in ROUTES})


_settings = from_environment()  # read once, on import


def settings() -> RouteSettings:
    """The routes in force now."""
    return _settings


def set_routes(enabled: Optional[bool] = None, **changes: bool | int) -> RouteSettings:
    """Turn every route on or off (`enabled`), then apply `changes` (route names or other `RouteSettings`
    fields); returns the settings that were in force before, for `restore`."""
    global _settings
    previous = _settings
    base = previous if enabled is None else dataclasses.replace(previous, **{name: enabled for name in ROUTES})
    unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(RouteSettings)})
    if unknown:
        raise UserError(f"unknown CPU route setting {', '.join(unknown)}; routes are {', '.join(ROUTES)}")
    _settings = dataclasses.replace(base, **changes)
    return previous


def restore(previous: RouteSettings) -> None:
    """Put back settings that `set_routes` returned."""
    global _settings
    _settings = previous


@contextlib.contextmanager
def routes(enabled: Optional[bool] = None, **changes: bool | int) -> Iterator[RouteSettings]:
    """`set_routes` for the body of a `with` block (process-wide, like timm's `set_layer_config`)."""
    previous = set_routes(enabled, **changes)
    try:
        yield _settings
    finally:
        restore(previous)


# ---------------------------------------------------------------------------------------------------- guards


def _plain_eager(x: torch.Tensor) -> bool:
    """Whether `x` is a real tensor in plain eager execution, where a route may apply: not a torch.fx Proxy, not
    under torch.jit.trace or torch.compile / torch.export (tracers must see the plain modules), and no vmap /
    grad / jvp transform or forward-mode AD running (they need the plain out-of-place ops)."""
    return (
        isinstance(x, torch.Tensor)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        # no forward-AD dual level open (`torch._C._is_fwd_grad_enabled()` is not this test: it is true
        # everywhere outside inference_mode, torch.no_grad() included)
        and getattr(forward_ad, "_current_level", 0) < 0  # if torch renames it: the plain path
    )


def _global_forward_hooks() -> bool:
    """Whether forward hooks registered for every module (profilers, FLOP counters) are installed."""
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


@functools.cache
def _avx512_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def training_routes_on_this_cpu() -> bool:
    """Whether the training routes may apply on this CPU: one whose ATen kernels are not AVX-512 ones (where
    they were measured), or any with `on_avx512` set."""
    return _settings.on_avx512 or not _avx512_kernels()


def may_overwrite(x: torch.Tensor, *holders: nn.Module, made_from: Optional[torch.Tensor] = None) -> bool:
    """The one rule for writing into a feature map in place: whether `x` may be overwritten.

    Only in plain eager execution with autograd off (inference: backward would need the old values), only when
    no forward hook has been handed `x` (those of `holders`, the modules that returned `x` or were passed it,
    and global ones: a hook may keep what it was given), and, given `made_from`, only when `x` is not
    `made_from` or a view of it (a module replaced by one that returns its input, e.g. nn.Identity after
    pruning, would otherwise make us overwrite the caller's tensor).
    """
    return (
        not torch.is_grad_enabled()
        and _plain_eager(x)
        and not _global_forward_hooks()
        and not any(holder._forward_hooks or holder._forward_pre_hooks for holder in holders)
        and (made_from is None or x.untyped_storage().data_ptr() != made_from.untyped_storage().data_ptr())
    )


# ---------------------------------------------------------------------------- channels_last in CPU inference


@torch.jit.unused  # TorchScript takes the plain module path
def inference_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` (an NCHW image batch) in the layout eager CPU inference runs the network in: NHWC.

    On the CPU, oneDNN computes convolutions in NHWC; handed NCHW it reorders every layer's input and output.
    The caller's layout is irrelevant to the logits, so eager CPU inference (autograd off) converts once at the
    stem (`benchmarks/eager_speed.py` measures ours against the peers with it).  Training keeps the caller's
    layout (`train --channels-last` chooses), as do CUDA, tracers and compilers.  Returns `x` itself where the
    route does not apply, so `inside is not x` tells the caller whether to give its layout back.
    """
    if (
        _settings.channels_last
        and not torch.is_grad_enabled()
        and _plain_eager(x)
        and x.dim() == 4
        and x.device.type == "cpu"
        # (N, 1, H, W) counts as channels_last-contiguous either way; its stride(1) says which layout it has
        and not (x.is_contiguous(memory_format=torch.channels_last) and (x.stride(1) == 1 or x.shape[1] != 1))
    ):
        return to_channels_last(x)
    return x


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` in NHWC strides, also with one channel (where `.contiguous(channels_last)` keeps NCHW strides)."""
    if x.shape[1] == 1:
        return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- BatchNorm in CPU inference


@torch.jit.unused  # TorchScript takes the plain module path
def batch_norm(norm: nn.Module, x: torch.Tensor, conv: nn.Module, conv_input: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for `x = conv(conv_input)`; in eager CPU inference on large maps, written into `x` itself.

    `nn.BatchNorm2d` writes its output to a new tensor.  At batch 32 those are tens of MB each, and glibc hands
    blocks that large back to the kernel when freed, so a fresh one per layer means page faults on every layer of
    every call (`allocator.keep_freed_memory` avoids most, not all, of that cost).  A conv output is ours to
    overwrite (`may_overwrite`), so on maps of at least `inplace_batchnorm_min_elements` ATen's own BatchNorm
    kernel (`native_batch_norm.out`, the one `F.batch_norm` calls) writes into its input: each element is read
    before it is written, and the result is bit-identical.  Only on the CPU (CUDA's caching allocator makes
    allocation cheap), for a plain eval-mode `nn.BatchNorm2d` with running statistics and no forward hooks (a
    hooked BN is called as a module, so its hooks run).  Criterion: the eager network at batch 32 faster by more
    than 5% with it than without, with and without `keep_freed_memory`, as `benchmarks/route_ablation.py` times it
    (each inference route on against off, interleaved).
    """
    if (  # the cheap tests first: this runs for every BN of every forward
        not _settings.inplace_batchnorm
        or not isinstance(x, torch.Tensor)  # a torch.fx Proxy: the traced graph gets the plain module
        or norm.training
        or type(norm) is not nn.BatchNorm2d
        or torch.is_grad_enabled()
        or x.dim() != 4
        or x.device.type != "cpu"
        or x.numel() < _settings.inplace_batchnorm_min_elements
        or norm.running_mean is None
        or norm.running_var is None
        or x.dtype != norm.running_var.dtype
        or norm._forward_hooks or norm._forward_pre_hooks
        or not may_overwrite(x, conv, made_from=conv_input)
    ):
        return norm(x)
    torch.ops.aten.native_batch_norm.out(
        x, norm.weight, norm.bias, norm.running_mean, norm.running_var, False, 0.0, norm.eps,
        out=x, save_mean=x.new_empty(0), save_invstd=x.new_empty(0),
    )
    return x


# ------------------------------------------------------------------------------ small-map convs in CPU training


def routable(kernel_size: int, *, stride: int, dilation: int, groups: int, in_channels: int, out_channels: int,
             padding: int) -> bool:
    """Whether a conv of this geometry (zero padding `padding` on every side) can take a training route: a 1x1
    stride-1 dense conv (`pointwise_gemm`), or a padded depthwise conv without dilation (`padded_depthwise`,
    `depthwise_taps`).  `layers.make_conv` builds those as `RoutedConv2d`, every other conv as `nn.Conv2d`."""
    pointwise = kernel_size == 1 and stride == 1 and groups == 1 and padding == 0
    depthwise = groups > 1 and groups == in_channels == out_channels and dilation == 1 and padding > 0
    return pointwise or depthwise


class RoutedConv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, state-dict keys and hooks) that CPU training may run by a faster kernel.

    Called as a module, so its hooks, forward and backward, run whichever kernel computes it.  `conv_route`
    picks the kernel per call; everywhere else, TorchScript included, it is `nn.Conv2d.forward`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        return _routed_conv(self, x)


@torch.jit.unused  # TorchScript takes RoutedConv2d's plain branch
def _routed_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    route = conv_route(conv, x)
    if route == "pointwise_gemm":
        return _pointwise_gemm(conv, x)
    if route == "depthwise_taps":
        out = depthwise_by_taps(x, conv.weight, conv.stride, conv.padding)
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)
    if route == "padded_depthwise":
        pad_h, pad_w = conv.padding
        return F.conv2d(F.pad(x, [pad_w, pad_w, pad_h, pad_h]), conv.weight, conv.bias, conv.stride, 0, 1,
                        conv.groups)
    return conv._conv_forward(x, conv.weight, conv.bias)


def conv_route(conv: nn.Conv2d, x: torch.Tensor) -> Optional[str]:
    """The route `conv(x)` takes: "pointwise_gemm", "depthwise_taps", "padded_depthwise", or None (the plain conv).

    On CPUs without AVX-512, oneDNN 3.12 (torch 2.14) is slow at the forward + backward of two kinds of conv on
    small maps, which small inputs (Fashion-MNIST's 28x28 with stem stride 1, CIFAR's 32x32) put in the last stages
    and every squeeze-excite and the head put everywhere (`benchmarks/small_conv_speed.py` times each such layer
    every way, `benchmarks/train_step_speed.py` the whole training step with and without):

    - a 1x1 conv on a map of at most `pointwise_gemm_max_pixels` pixels is one matrix product (`F.linear` on the
      (N*H*W, C) view of the NHWC data; input and output are views, nothing is copied).  On larger maps the GEMM
      was as fast or slower.  Only for a module in training mode (an eval-mode model under autograd, as tracers
      and saliency tools run it, keeps the conv).
    - a depthwise kernel larger than its map: oneDNN has no JIT kernel for the weight gradient of such a padded
      conv and falls back to im2col + GEMM, while the same conv on a pre-padded map takes its JIT kernels (zero
      padding is zero padding).  Outputs of at most `depthwise_taps_max_pixels` pixels skip the padding: most
      taps of even the pre-padded conv multiply padding there, so `_DepthwiseByTaps` computes only those that
      land on the map.  Where the kernel fits in the map, or in NCHW, or with dilation, the pre-padded form was
      slower, so it is used only on overhanging kernels.

    All on a float32 channels_last batch with autograd on and autocast off, in plain eager mode, on a CPU whose
    ATen kernels are not AVX-512 ones (none could be measured; `RouteSettings.on_avx512` tries them there).
    """
    s = _settings
    if not (  # the cheap tests first: this runs for every routable conv of every training forward
        torch.is_grad_enabled()
        and isinstance(x, torch.Tensor)  # not a torch.fx Proxy: the traced graph gets the plain conv
        and x.device.type == "cpu"
        and _plain_eager(x)  # before any test of x's shape: a tracer would guard on it
        and x.dim() == 4
        and x.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_autocast_enabled("cpu")
        and training_routes_on_this_cpu()
    ):
        return None
    if conv.groups == 1:
        if (s.pointwise_gemm and conv.training and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                and conv.padding == (0, 0) and x.shape[-2] * x.shape[-1] <= s.pointwise_gemm_max_pixels):
            return "pointwise_gemm"
        return None
    if (conv.groups != conv.in_channels or conv.groups != conv.out_channels or conv.padding_mode != "zeros"
            or conv.dilation != (1, 1) or not isinstance(conv.padding, tuple) or conv.padding == (0, 0)
            or (x.shape[-2] >= conv.kernel_size[0] and x.shape[-1] >= conv.kernel_size[1])):
        return None
    pad_h, pad_w = conv.padding
    out_h = (x.shape[-2] + 2 * pad_h - conv.kernel_size[0]) // conv.stride[0] + 1
    out_w = (x.shape[-1] + 2 * pad_w - conv.kernel_size[1]) // conv.stride[1] + 1
    if s.depthwise_taps and out_h * out_w <= s.depthwise_taps_max_pixels:
        return "depthwise_taps"
    return "padded_depthwise" if s.padded_depthwise else None


def _pointwise_gemm(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    n, channels, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, channels)  # a view: x is NHWC in memory
    out = F.linear(rows, conv.weight.view(conv.out_channels, channels), conv.bias)
    return out.view(n, h, w, conv.out_channels).permute(0, 3, 1, 2)  # NCHW shape, NHWC strides, as conv gives


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
    batch.  The Python loop grows with the taps on the map, so `depthwise_taps_max_pixels` keeps it to outputs
    of the sizes `benchmarks/small_conv_speed.py` measured faster.  The backward is made of differentiable ops,
    so double backward works (slowly).
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


def depthwise_by_taps(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                      padding: tuple[int, int]) -> torch.Tensor:
    """The `depthwise_taps` kernel: `F.conv2d(x, weight, None, stride, padding, 1, groups=C)` on a channels_last
    `x`, computing only the taps that land on the map (`_DepthwiseByTaps`)."""
    return _DepthwiseByTaps.apply(x, weight, stride, padding)
