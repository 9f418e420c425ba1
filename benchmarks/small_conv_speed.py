"""Forward + backward of each small-map convolution that CPU training routes around oneDNN, per layer, side by side.

`mobilenetv3.models.layers.call_conv` sends two kinds of conv another way during CPU training (see the README's
notes on them): 1x1 convs on maps of at most 16 pixels become one GEMM (`_pointwise_conv_as_matmul`), and
depthwise kernels larger than their map run on an explicitly padded map, or tap by tap where the output has at
most 4 pixels (`_DepthwiseByTaps`).  This script finds those layers in a real network (a forward pass records
each conv's input shape), then times forward + backward of each distinct one every way, round-robin, and prints
one JSON line per layer: median ms per way, the ratio of the plain conv (and the padded one) to the route, and for
1x1 convs the multiply-accumulates per second (forward + backward = 3x the forward's MACs).

    .venv/bin/python benchmarks/small_conv_speed.py            # the fashion-mnist-large network, batch 128, 1 thread
    .venv/bin/python benchmarks/small_conv_speed.py --model mobilenetv3_small_100 --batch-size 256
    .venv/bin/python benchmarks/small_conv_speed.py --gemm-max-pixels 784   # 1x1 convs on every map size as well
"""

from __future__ import annotations

import argparse
import json
import statistics

from unittest import mock

import torch

from mobilenetv3.allocator import keep_freed_memory
from mobilenetv3.deploy.bench import time_interleaved
from mobilenetv3.models import layers
from train_step_speed import add_network_arguments, make_images, make_network  # a sibling script: its folder is on sys.path


def routed_layers(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[str, torch.nn.Conv2d, torch.Size]]:
    """(name, conv, input shape) of each distinct conv that a training forward sends along a route."""
    seen: dict[tuple, tuple[str, torch.nn.Conv2d, torch.Size]] = {}

    def record(name: str):
        def hook(conv: torch.nn.Conv2d, args: tuple) -> None:
            key = (tuple(args[0].shape), conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.groups, conv.bias is not None)
            seen.setdefault(key, (name, conv, args[0].shape))
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
               if type(module) is torch.nn.Conv2d]
    model(images)
    for handle in handles:
        handle.remove()  # hooked convs never take a route: the probes below need them bare
    routed = []
    for name, conv, shape in seen.values():
        probe = layers.to_channels_last(torch.zeros(shape))
        if layers._pointwise_conv_as_matmul(conv, probe) is not None or \
                layers._padded_depthwise_conv(conv, probe) is not None:
            routed.append((name, conv, shape))
    return routed


def padded_only(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The library's pre-padded depthwise conv, with the tap-by-tap route turned off."""
    with mock.patch.object(layers, "TAPS_DEPTHWISE_MAX_OUTPUT_PIXELS", 0):
        return layers._padded_depthwise_conv(conv, x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per way and layer")
    parser.add_argument("--gemm-max-pixels", type=int, default=layers.MATMUL_POINTWISE_MAX_PIXELS,
                        help="time 1x1 convs on maps up to this many pixels as a GEMM (the library's bound by default)")
    args = parser.parse_args()
    layers.MATMUL_POINTWISE_MAX_PIXELS = args.gemm_max_pixels  # this process only: what to measure
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `mobilenetv3 train` does on the CPU
    model, images = make_network(args), make_images(args)
    if layers._avx512_kernels():
        print(json.dumps({"note": "AVX-512 CPU: the library keeps the routes off here",
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
        return 0

    for name, conv, shape in routed_layers(model, images):  # in forward order
        x = layers.to_channels_last(torch.randn(shape)).requires_grad_()
        grad_out = None

        def forward_backward(forward):
            def run() -> None:
                nonlocal grad_out
                out = forward()
                if grad_out is None:
                    grad_out = torch.randn_like(out)
                out.backward(grad_out)
                x.grad = None
                conv.zero_grad(set_to_none=True)
            return run

        if conv.groups == 1:
            ways = {"route": lambda: layers._pointwise_conv_as_matmul(conv, x)}
        else:
            ways = {"route": lambda: layers._padded_depthwise_conv(conv, x), "padded": lambda: padded_only(conv, x)}
        ways["plain"] = lambda: conv(x)  # no hooks, called as a module: oneDNN's convolution
        seconds = time_interleaved({way: forward_backward(fn) for way, fn in ways.items()},
                                   device=torch.device("cpu"), warmup=2, min_repeats=args.repeats, min_seconds=0.0)
        medians = {way: statistics.median(values) for way, values in seconds.items()}
        out_shape = ways["plain"]().shape
        row = {"layer": name, "input": list(shape[1:]), "output": list(out_shape[1:]),
               "kernel": list(conv.kernel_size), "stride": list(conv.stride),
               "route": "gemm" if conv.groups == 1 else (
                   "taps" if out_shape[-2] * out_shape[-1] <= layers.TAPS_DEPTHWISE_MAX_OUTPUT_PIXELS else "padded"),
               **{f"median_ms_{way}": round(1000 * value, 2) for way, value in medians.items()},
               **{f"ratio_{way}_over_route": round(value / medians["route"], 2)
                  for way, value in medians.items() if way != "route"}}
        if conv.groups == 1:
            macs = out_shape.numel() * conv.in_channels  # forward multiply-accumulates
            row.update({f"gmac_per_s_{way}": round(3 * macs / medians[way] / 1e9, 1) for way in ("route", "plain")})
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
