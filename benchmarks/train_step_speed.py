"""CPU training step with and without the library's faster routes for small-map convolutions, side by side.

On small inputs (Fashion-MNIST's 28x28 with stem stride 1) the last stages run 5x5 depthwise kernels on 4x4 and
2x2 maps, and every squeeze-excite and the head run 1x1 convs on 1x1 maps.  On CPUs without AVX-512, oneDNN
is slow on both, so during CPU training the library (`mobilenetv3.cpu_routes`, docs/performance.md) pads
overhanging depthwise kernels explicitly (`padded_depthwise`), computes those with at most 4 output pixels tap by
tap (`depthwise_taps`), and runs 1x1 convs on maps of at most 16 pixels as one GEMM (`pointwise_gemm`).  This script times full
training steps (forward, backward, SGD step; `mobilenetv3 bench --train`'s step) of one network three ways,
alternating step by step so that a change in machine load hits all alike, and reports the median ms/step of
each and the ratios: `fast` (the library as shipped), `padded_only` (explicit padding only, the library before
the tap-by-tap and GEMM routes) and `plain` (every conv called as a module).  Every run is appended to
benchmarks/results/train_step_speed.jsonl; `make results` renders it into docs/results.md.

    .venv/bin/python benchmarks/train_step_speed.py            # the fashion-mnist-large network, batch 128, 1 thread
    .venv/bin/python benchmarks/train_step_speed.py --model mobilenetv3_small_100 --batch-size 256
    .venv/bin/python benchmarks/train_step_speed.py --on-avx512   # where the library keeps the routes off: try it
    .venv/bin/python benchmarks/train_step_speed.py --compile     # also time a torch.compile'd copy (`--compile`)

With --compile a fourth contestant joins the round-robin: the same network (same initial weights) wrapped in
`torch.compile`, as `mobilenetv3 train --compile` does; its first call (the compilation) is timed on its own.
Under a compiler the faster routes stay off (inductor sees the plain convolutions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import results  # benchmarks/results.py: this script's folder is on sys.path
from mobilenetv3 import create_model
from mobilenetv3.allocator import keep_freed_memory
from mobilenetv3.timing import sgd_step, time_interleaved
from mobilenetv3 import cpu_routes


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The network and batch to time: by default one `fashion-mnist-large` process's (also used by
    `small_conv_speed.py`)."""
    parser.add_argument("--model", default="mobilenetv3_large_125")
    parser.add_argument("--input-size", type=int, default=28)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--stem-stride", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128, help="per process, as in the recipe")
    parser.add_argument("--threads", type=int, default=1, help="as each of the recipe's 2 processes")


def make_network(args: argparse.Namespace) -> torch.nn.Module:
    """The network of `add_network_arguments`, in channels_last with fixed initial weights."""
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=args.in_chans, stem_stride=args.stem_stride)
    return model.to(memory_format=torch.channels_last)


def make_images(args: argparse.Namespace) -> torch.Tensor:
    return cpu_routes.to_channels_last(torch.randn(args.batch_size, args.in_chans, args.input_size, args.input_size))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per setting")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd copy of the network")
    parser.add_argument("--on-avx512", action="store_true",
                        help="use the routes on a CPU with AVX-512 kernels too, where the library leaves them off")
    args = parser.parse_args()
    if args.on_avx512:
        cpu_routes.set_routes(on_avx512=True)

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `mobilenetv3 train` does on the CPU

    images = make_images(args)
    step = sgd_step(make_network(args), images, torch.device("cpu"))  # one SGD step, as `mobilenetv3 bench --train` times it

    def padded_only_step() -> None:
        with cpu_routes.routes(depthwise_taps=False, pointwise_gemm=False):
            step()

    def plain_step() -> None:
        with cpu_routes.routes(enabled=False):  # every conv by nn.Conv2d's forward
            step()

    contestants = {"fast": step, "padded_only": padded_only_step, "plain": plain_step}
    compile_seconds = None
    if args.compile:
        compiled_step = sgd_step(torch.compile(make_network(args)), images, torch.device("cpu"))
        started = time.perf_counter()
        compiled_step()  # the first call compiles the forward and the backward graph
        compile_seconds = time.perf_counter() - started
        contestants["compiled"] = compiled_step

    # round-robin, one step each, after a warm-up step each (oneDNN builds its kernels on first use)
    seconds = time_interleaved(contestants, device=torch.device("cpu"), warmup=1, min_repeats=args.steps,
                               min_seconds=0.0)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    compiled = {} if compile_seconds is None else {
        "median_ms_compiled": round(1000 * medians["compiled"], 1), "compile_s": round(compile_seconds, 1),
        "median_ratio_compiled_over_fast": round(medians["compiled"] / medians["fast"], 3)}
    measured = {
        "model": args.model, "input": [args.in_chans, args.input_size, args.input_size],
        "stem_stride": args.stem_stride, "batch_size": args.batch_size, "threads": args.threads,
        "steps": args.steps,
        **{f"median_ms_{name}": round(1000 * medians[name], 1) for name in ("fast", "padded_only", "plain")},
        "median_ratio_padded_only_over_fast": round(medians["padded_only"] / medians["fast"], 3),
        "median_ratio_plain_over_fast": round(medians["plain"] / medians["fast"], 3), **compiled,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "routes_used": cpu_routes.training_routes_on_this_cpu(),
    }
    print(json.dumps(measured))
    results.record("train_step_speed", measured, argv=sys.argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
