"""Latency / throughput of our model per engine and batch size, side by side with torchvision and timm.

The networks being compared are timed by `mobilenetv3.timing`: warmed up, then run interleaved call by call,
each with BatchNorm statistics calibrated on the same random batch.  Latency is the median and 90th
percentile of single calls; throughput is batch / median.

"Peak" is the machine's measured dense matmul rate in the same dtype (a large GEMM, timed here), so
`peak_fraction` says how much of what this machine's BLAS reaches the network reaches.

ExecuTorch engines (the `[mobile]` extra): "executorch" runs a verified float32 XNNPACK program of our
network, "executorch-int8" an int8 one (PT2E post-training quantization, calibrated on the same in-range
batch as the BatchNorm statistics, by `deploy.quantize.quantize_to_pte`).  ExecuTorch programs have a
fixed batch size, so one program is exported per batch size; they run with torch's thread count.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..factory import create_model
from ..models.registry import get_entry
from ..profile import count_macs
from ..timing import CLOCKS, calibrate_batchnorm, measure_peak_flops, percentile, sgd_step, time_interleaved
from .engines import ExecuTorchEngine, OnnxRuntimeEngine
from .executorch import require_executorch, require_quantization
from .export import ExportFormat, export_model
from .quantize import quantize_to_pte

logger = logging.getLogger(__name__)

PEERS = ("torchvision", "timm")
CPU_ENGINES = ("eager", "channels-last", "compile", "onnxruntime", "executorch", "executorch-int8")
#: Engines that run an exported artifact on numpy arrays rather than a torch module.
ARTIFACT_ENGINES = ("onnxruntime", "executorch", "executorch-int8")
GPU_ENGINES = ("eager", "channels-last", "amp-bf16", "amp-fp16", "compile")
TORCH_ENGINES = ("eager", "compile", "channels-last", "amp-bf16", "amp-fp16")  # peers can run these


def peer_model(peer: str, model_name: str, **kwargs: Any) -> nn.Module:
    """The peer library's network matching one of our registered names (same arch and width)."""
    entry = get_entry(model_name)
    width = float(kwargs.get("width_mult", entry.defaults.get("width_mult", 1.0)))
    num_classes = int(kwargs.get("num_classes", 1000))
    if entry.arch not in ("large", "small"):
        raise UserError(f"{peer} has no {entry.arch} MobileNetV3 to compare with")
    if peer == "torchvision":
        import torchvision  # only for --compare: a second of start-up that a plain `bench` does not pay

        build = getattr(torchvision.models, f"mobilenet_v3_{entry.arch}")
        return build(width_mult=width, num_classes=num_classes)
    if peer == "timm":
        import timm  # an optional peer, not a dependency

        name = f"mobilenetv3_{entry.arch}_{round(width * 100):03d}"
        if name not in timm.list_models(name):
            raise UserError(f"timm has no {name} to compare with")
        return timm.create_model(name, num_classes=num_classes)
    raise UserError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


@dataclass
class BenchRow:
    network: str  # "ours", "torchvision", "timm"
    engine: str
    batch_size: int
    mode: str  # "inference" or "train"
    median_ms: float
    p90_ms: float
    images_per_s: float
    gflop_per_image: float
    peak_fraction: float
    calls: int
    speedup: dict[str, float] = field(default_factory=dict)  # peer -> peer median / our median

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _engine_dtype(engine: str) -> torch.dtype:
    return {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}.get(engine, torch.float32)


def onnxruntime_engine(model: nn.Module, resolution: int):
    """ONNX Runtime on a verified dynamic-batch export of `model` (in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="mobilenetv3-bench-") as folder:
        path = Path(folder) / "model.onnx"
        export_model(model.cpu().eval(), path, ExportFormat.ONNX, input_size=resolution, metadata={})
        return OnnxRuntimeEngine(path, threads=torch.get_num_threads())  # the session holds the graph


def executorch_engine(model: nn.Module, resolution: int, batch: int, *, int8: bool = False,
                      calibration: torch.Tensor | None = None):
    """ExecuTorch on a `batch`-sized XNNPACK program of `model` (in a temporary folder): float32, exported and
    verified by `export_model`, or with `int8` quantized by `deploy.quantize.quantize_to_pte`, calibrated on
    `calibration` (images in the range the BatchNorm statistics were taken on)."""
    require_executorch(f"engine {'executorch-int8' if int8 else 'executorch'}")
    with tempfile.TemporaryDirectory(prefix="mobilenetv3-bench-") as folder:
        path = Path(folder) / "model.pte"
        model = model.cpu().eval()
        if int8:
            if calibration is None:
                calibration = torch.randn(8, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
            # Timing only: a random network's int8 top-1 need not agree with float32's (`quantize` checks that).
            quantize_to_pte(model, [calibration], path, {}, batch=batch, min_agreement=0.0,
                            threads=torch.get_num_threads())
        else:
            export_model(model, path, ExportFormat.EXECUTORCH, input_size=resolution, batch=batch, metadata={})
        return ExecuTorchEngine(path, threads=torch.get_num_threads())  # the program holds its bytes


def _inference_fn(model: nn.Module, engine: str, images: torch.Tensor, device: torch.device) -> Callable[[], Any]:
    """A no-argument callable running `model` (a torch module, or an ONNX Runtime / ExecuTorch engine) on `images`."""
    if engine in ARTIFACT_ENGINES:
        array = images.cpu().numpy()
        return lambda: model(array)
    model = model.eval().to(device)
    if engine in ("channels-last", "amp-bf16", "amp-fp16") or (engine == "compile" and device.type == "cuda"):
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    runner: Callable = model
    if engine == "compile":
        runner = torch.compile(model)
    dtype = _engine_dtype(engine)

    def call() -> Any:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return runner(images)

    return call


def benchmark(
    model_name: str,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    engines: Sequence[str] | None = None,
    compare: Sequence[str] = (),
    train: bool = False,
    resolution: int = 224,
    device: str | None = None,
    warmup: int = 3,
    min_repeats: int = 10,
    min_seconds: float = 1.0,
    model_kwargs: dict[str, Any] | None = None,
    clock: str = "wall",
) -> list[BenchRow]:
    """Time our `model_name` (and the peers in `compare`) for every engine and batch size.

    Peers run in every torch engine; ONNX Runtime and ExecuTorch rows are compared with the peers' eager rows.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available")
    engines = list(engines or (GPU_ENGINES if dev.type == "cuda" else ("eager", "onnxruntime")))
    known = set(CPU_ENGINES) | set(GPU_ENGINES)
    for engine in engines:
        if engine not in known:
            raise UserError(f"unknown engine {engine!r}; choose from {', '.join(sorted(known))}")
        if engine in ("amp-bf16", "amp-fp16") and dev.type != "cuda":
            raise UserError(f"engine {engine} needs a CUDA GPU (CPU engines: {', '.join(CPU_ENGINES)})")
        if engine.startswith("executorch"):
            if dev.type != "cpu":
                raise UserError(f"engine {engine} runs on the CPU: pass --device cpu")
            # before any network is built or timed
            (require_quantization if engine == "executorch-int8" else require_executorch)(f"engine {engine}")
    if any(b < 1 for b in batch_sizes):
        raise UserError("batch sizes must be positive")
    if clock not in CLOCKS:
        raise UserError(f"unknown clock {clock!r}; choose from {', '.join(CLOCKS)}")
    model_kwargs = dict(model_kwargs or {})

    generator = torch.Generator().manual_seed(0)
    # At least ~64 values per channel in the last (stride 32) stage, or the statistics are degenerate
    # (near-zero variances) and activations leave the normal float range.
    calibration_images = max(8, math.ceil(64 / max(1, resolution // 32) ** 2))
    calibration = torch.randn(calibration_images, 3, resolution, resolution, generator=generator)
    networks: dict[str, nn.Module] = {"ours": create_model(model_name, **model_kwargs)}
    for peer in compare:
        networks[peer] = peer_model(peer, model_name, **model_kwargs)
    flops = {}
    for name, network in networks.items():
        calibrate_batchnorm(network, calibration)
        flops[name] = 2 * count_macs(network, resolution)
    peaks = {dtype: measure_peak_flops(dev, dtype, seconds=min(1.0, min_seconds), clock=clock)
             for dtype in {_engine_dtype(e) for e in engines}}
    logger.info("measured matmul peak on %s: %s", dev,
                ", ".join(f"{str(d).replace('torch.', '')} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()))

    rows: list[BenchRow] = []
    onnx_engines = {name: onnxruntime_engine(copy.deepcopy(networks[name]), resolution)
                    for name in ("ours",) if "onnxruntime" in engines}
    if train and 1 in batch_sizes:
        logger.info("no training rows at batch 1: BatchNorm cannot train on one image")
    for batch in batch_sizes:
        images = torch.randn(batch, 3, resolution, resolution, generator=generator).to(dev)
        jobs = [(engine, "inference") for engine in engines] + ([("eager", "train")] if train and batch > 1 else [])
        for engine, mode in jobs:
            fns: dict[str, Callable[[], Any]] = {}
            for name, network in networks.items():
                if name != "ours" and mode == "inference" and engine not in TORCH_ENGINES:
                    continue
                if engine == "onnxruntime":
                    net = onnx_engines[name]
                elif engine.startswith("executorch"):
                    net = executorch_engine(copy.deepcopy(network), resolution, batch,
                                            int8=engine == "executorch-int8", calibration=calibration)
                else:
                    net = copy.deepcopy(network)
                fns[name] = sgd_step(net, images, dev) if mode == "train" else _inference_fn(net, engine, images, dev)
            logger.info("timing %s %s batch %d: %s", engine, mode, batch, ", ".join(fns))
            times = time_interleaved(fns, device=dev, warmup=warmup, min_repeats=min_repeats, min_seconds=min_seconds, clock=clock)
            peak = peaks[_engine_dtype(engine)]
            for name, calls in times.items():
                median = statistics.median(calls)
                work = flops[name] * (3 if mode == "train" else 1)  # backward is ~2x the forward
                rows.append(BenchRow(
                    network=name, engine=engine, batch_size=batch, mode=mode, median_ms=median * 1e3,
                    p90_ms=percentile(calls, 0.9) * 1e3, images_per_s=batch / median,
                    gflop_per_image=flops[name] / 1e9, peak_fraction=work * batch / median / peak,
                    calls=len(calls),
                ))
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[BenchRow]) -> None:
    """On our rows: peer median / our median, against the peer in the same engine (else its eager row)."""
    index = {(r.network, r.engine, r.batch_size, r.mode): r for r in rows}
    for row in rows:
        if row.network != "ours":
            continue
        for (network, engine, batch, mode), other in index.items():
            if network == "ours" or batch != row.batch_size or mode != row.mode:
                continue
            same = (network, row.engine, batch, mode) in index
            if engine == row.engine or (not same and engine == "eager"):
                row.speedup[network] = other.median_ms / row.median_ms


def format_table(rows: Sequence[BenchRow]) -> str:
    peers = sorted({p for r in rows for p in r.speedup})
    header = (f"{'network':12s} {'engine':15s} {'mode':9s} {'batch':>5s} {'median ms':>10s} {'p90 ms':>9s} "
              f"{'img/s':>8s} {'% peak':>7s}" + "".join(f" {'vs ' + p:>14s}" for p in peers))
    lines = [header]
    for r in rows:
        ratios = "".join(f" {r.speedup[p]:13.2f}x" if p in r.speedup else f" {'':14s}" for p in peers)
        lines.append(f"{r.network:12s} {r.engine:15s} {r.mode:9s} {r.batch_size:5d} {r.median_ms:10.2f} "
                     f"{r.p90_ms:9.2f} {r.images_per_s:8.1f} {100 * r.peak_fraction:6.1f}%{ratios}")
    return "\n".join(lines)
