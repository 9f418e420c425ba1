"""Forward + backward of each small-map convolution that CPU training routes around oneDNN, per layer, side by side.

`mobilenetv3.cpu_routes` sends two kinds of conv another way during CPU training (docs/performance.md says
why): 1x1 convs on maps of at most 16 pixels become one GEMM (`pointwise_gemm`), and depthwise kernels larger
than their map run on an explicitly padded map (`padded_depthwise`), or tap by tap where the output has at most
4 pixels (`depthwise_taps`).  This script finds those layers in a real network (a forward pass records
each conv's input shape), then times forward + backward of each distinct one every way, round-robin, and prints
one JSON line per layer: median ms per way, the ratio of the plain conv (and the padded one) to the route, and for
1x1 convs the multiply-accumulates per second (forward + backward = 3x the forward's MACs); the run is appended
to benchmarks/results/small_conv_speed.jsonl.

    .venv/bin/python benchmarks/small_conv_speed.py            # the fashion-mnist-large network, batch 128, 1 thread
    .venv/bin/python benchmarks/small_conv_speed.py --model mobilenetv3_small_100 --batch-size 256
    .venv/bin/python benchmarks/small_conv_speed.py --gemm-max-pixels 784   # 1x1 convs on every map size as well
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import results  # benchmarks/results.py: this script's folder is on sys.path
from mobilenetv3.allocator import keep_freed_memory
from mobilenetv3.timing import time_interleaved
from mobilenetv3 import cpu_routes
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
               if isinstance(module, cpu_routes.RoutedConv2d)]
    model(images)
    for handle in handles:
        handle.remove()
    routed = []
    for name, conv, shape in seen.values():
        if cpu_routes.conv_route(conv, cpu_routes.to_channels_last(torch.zeros(shape))) is not None:
            routed.append((name, conv, shape))
    return routed


def padded_only(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The library's pre-padded depthwise conv, with the tap-by-tap route turned off."""
    with cpu_routes.routes(depthwise_taps=False):
        return conv(x)


def plain(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d's forward: oneDNN's convolution."""
    with cpu_routes.routes(enabled=False):
        return conv(x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per way and layer")
    parser.add_argument("--gemm-max-pixels", type=int, default=cpu_routes.settings().pointwise_gemm_max_pixels,
                        help="time 1x1 convs on maps up to this many pixels as a GEMM (the library's bound by default)")
    args = parser.parse_args()
    cpu_routes.set_routes(pointwise_gemm_max_pixels=args.gemm_max_pixels)  # this process only: what to measure
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `mobilenetv3 train` does on the CPU
    model, images = make_network(args), make_images(args)
    if not cpu_routes.training_routes_on_this_cpu():
        note = {"note": "AVX-512 CPU: the library keeps the routes off here",
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        print(json.dumps(note))
        results.record("small_conv_speed", {**note, "rows": []}, argv=sys.argv)
        return 0

    rows = []

    for name, conv, shape in routed_layers(model, images):  # in forward order
        x = cpu_routes.to_channels_last(torch.randn(shape)).requires_grad_()
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

        ways = {"route": lambda: conv(x)}  # the library as shipped
        if conv.groups > 1:
            ways["padded"] = lambda: padded_only(conv, x)
        ways["plain"] = lambda: plain(conv, x)
        seconds = time_interleaved({way: forward_backward(fn) for way, fn in ways.items()},
                                   device=torch.device("cpu"), warmup=2, min_repeats=args.repeats, min_seconds=0.0)
        medians = {way: statistics.median(values) for way, values in seconds.items()}
        out_shape = ways["plain"]().shape
        row = {"layer": name, "input": list(shape[1:]), "output": list(out_shape[1:]),
               "kernel": list(conv.kernel_size), "stride": list(conv.stride),
               "route": "gemm" if conv.groups == 1 else (
                   "taps" if out_shape[-2] * out_shape[-1] <= cpu_routes.settings().depthwise_taps_max_pixels else "padded"),
               **{f"median_ms_{way}": round(1000 * value, 2) for way, value in medians.items()},
               **{f"ratio_{way}_over_route": round(value / medians["route"], 2)
                  for way, value in medians.items() if way != "route"}}
        if conv.groups == 1:
            macs = out_shape.numel() * conv.in_channels  # forward multiply-accumulates
            row.update({f"gmac_per_s_{way}": round(3 * macs / medians[way] / 1e9, 1) for way in ("route", "plain")})
        print(json.dumps(row))
        rows.append(row)
    results.record("small_conv_speed", {"model": args.model, "batch_size": args.batch_size, "threads": args.threads,
                                        "gemm_max_pixels": args.gemm_max_pixels, "rows": rows}, argv=sys.argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
