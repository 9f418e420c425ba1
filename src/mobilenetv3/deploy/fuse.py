"""Fold BatchNorm into the preceding convolution for deployment (same outputs, fewer ops)."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_batchnorm(model: nn.Module, *, sequential: bool = False) -> nn.Module:
    """An eval-mode copy of `model` in which every `conv -> bn` pair (our `ConvNormAct`) is one conv.

    The folded conv computes `bn(conv(x))` with BN's running statistics: W' = W * g / sqrt(var + eps),
    b' = (b - mean) * g / sqrt(var + eps) + beta.  The model itself is not modified; module names and
    attributes (`config`, `preprocessing`, `class_names`) are kept, and each `bn` becomes an Identity.

    `sequential=True` also folds a Conv2d directly followed by a BatchNorm inside an `nn.Sequential`
    (torchvision's `Conv2dNormActivation`, as in the SSDLite extra blocks and head).
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        conv, norm = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, _BatchNorm) and norm.track_running_stats:
            module.conv = fuse_conv_bn_eval(conv, norm)
            module.bn = nn.Identity()
    if sequential:
        for module in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
            children = list(module._modules.items())
            for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, _BatchNorm) and norm.track_running_stats:
                    module._modules[conv_name] = fuse_conv_bn_eval(conv, norm)
                    module._modules[norm_name] = nn.Identity()
    return fused


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers in `model` (on a `fuse_batchnorm` result: those it could not fold)."""
    return sum(isinstance(module, _BatchNorm) for module in model.modules())
