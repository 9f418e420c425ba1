"""The timing harness `mobilenetv3 bench` and the scripts in `benchmarks/` share.

Method (the usual one): every callable is warmed up, then timed call by call; callables being compared run
interleaved, round by round (`time_interleaved`), so that drift of the machine (clock, other load) hits them
alike.  On a GPU each call is timed with CUDA events after a synchronize; on the CPU with `perf_counter`, or
with this process's CPU seconds (`clock="cpu"`, for a machine shared with other work).

Networks timed side by side first get BatchNorm statistics calibrated on the same batch (`calibrate_batchnorm`):
freshly initialised MobileNetV3s produce activations that shrink towards denormal floats, which are slow on
CPUs and would make a comparison depend on the initialisation instead of the code.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

#: "wall": elapsed seconds; "cpu": this process's CPU seconds (all threads).
CLOCKS = ("wall", "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> float:
    """Seconds of one call: CUDA events on a GPU, perf_counter on the CPU.

    `clock="cpu"` counts this process's CPU seconds instead (time.process_time): on a machine shared with
    other work it measures the work done rather than the wait for a core.  All threads count, so use it
    with one thread (`--threads 1`), or spinning worker threads are counted as work.
    """
    if clock == "cpu" and device.type != "cuda":
        begin = time.process_time()
        fn()
        return time.process_time() - begin
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def time_calls(fn: Callable[[], Any], *, device: torch.device, warmup: int, min_repeats: int,
               min_seconds: float, clock: str = "wall") -> list[float]:
    """Per-call seconds of `fn` alone (`time_interleaved` with one callable)."""
    return time_interleaved({"fn": fn}, device=device, warmup=warmup, min_repeats=min_repeats,
                            min_seconds=min_seconds, clock=clock)["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], *, device: torch.device, warmup: int, min_repeats: int,
                     min_seconds: float, clock: str = "wall") -> dict[str, list[float]]:
    """Per-call seconds of each function, run round-robin until each has `min_repeats` calls and has
    been timed for `min_seconds` in total."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(t) < min_repeats or sum(t) < min_seconds for t in times.values()):
        for name, fn in fns.items():
            times[name].append(time_one(fn, device, clock))
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile (0 < q <= 1) of `values`: one of the values, never an interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.0,
                       clock: str = "wall") -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (the practical dense peak), fastest call."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_calls(lambda: torch.mm(a, b), device=device, warmup=2, min_repeats=5, min_seconds=seconds,
                       clock=clock)
    return 2 * size**3 / min(times)


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running mean/var to the statistics of `images` (a cumulative average over
    one forward pass in train mode), then return the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def sgd_step(model: nn.Module, images: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """A no-argument callable running one training step (forward, cross-entropy, backward, SGD step) of
    `model` on the fixed batch `images`, against fixed random targets: the step `bench --train` times."""
    model = model.train().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    num_classes = model(images[:2]).shape[1]
    targets = torch.randint(0, num_classes, (images.shape[0],), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()

    return step
