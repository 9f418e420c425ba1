"""ONNX Runtime fp32 vs ExecuTorch (XNNPACK) fp32 vs ExecuTorch int8, side by side in one process (issue 23).

For each network (MobileNetV3-Large and -Small at 224 by default): random weights with BatchNorm statistics
calibrated on smooth random colour fields (in the data's range, as `export` verifies on), exported once to
ONNX (dynamic batch, BN folded), and to one fp32 and one int8 `.pte` per batch size (ExecuTorch programs have
a fixed batch).  Both fp32 files are `export.export_model`'s, verified against float64 as `mobilenetv3 export`
writes them.  The int8 program is `quantize.quantize_to_pte` (PT2E, XNNPACKQuantizer, per-channel),
calibrated on 64 other random fields.  Calls run round-robin (onnx, et-fp32, et-int8, onnx, ...) after a
warm-up, and the median per-call latency is reported; "vs ORT" is ONNX Runtime's median over the engine's
(> 1: faster).  The target: int8 >= 2.0x ONNX Runtime fp32 for Large at batch 1 and 32.  Also printed: the
file sizes and the kernel calls the int8 program makes outside its XNNPACK delegate.  Every run is appended to
benchmarks/results/mobile_speed.jsonl (`results.record`), from which `make results` renders docs/results.md.

    .venv/bin/python benchmarks/mobile_speed.py [--models mobilenetv3_large_100 mobilenetv3_small_100]
        [--batch-size 1 32] [--repeats 20] [--min-time 5] [--threads N] [--clock wall|cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import results  # benchmarks/results.py: this script's folder is on sys.path
from mobilenetv3.timing import calibrate_batchnorm, time_interleaved
from mobilenetv3.deploy.executorch import load_pte, require_executorch
from mobilenetv3.deploy.export import (ExportFormat, artifact_metadata, export_model, load_artifact,
                                       verification_inputs)
from mobilenetv3.deploy.quantize import quantize_to_pte
from mobilenetv3 import create_model
from mobilenetv3.preprocessing import Preprocessing


def smooth_images(count: int, size: int, seed: int, prep: Preprocessing) -> torch.Tensor:
    """`count` smooth random colour fields through `prep`'s normalisation: what `export` verifies on."""
    return verification_inputs(prep, size, (count,), seed=seed)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_large_100", "mobilenetv3_small_100"])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20, help="least timed calls per engine and batch size")
    parser.add_argument("--min-time", type=float, default=5.0, help="least timed seconds per engine and batch size")
    parser.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU seconds, robust to other load on a shared machine (use --threads 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    require_executorch("benchmarks/mobile_speed.py")
    size = args.input_size
    prep = Preprocessing(input_size=size)
    rows, sizes, outside = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models:
            torch.manual_seed(0)
            model = calibrate_batchnorm(create_model(name).eval(), smooth_images(32, size, 0, prep))
            metadata = artifact_metadata(model, prep)
            onnx_path = folder / f"{name}.onnx"
            export_model(model, onnx_path, ExportFormat.ONNX, input_size=size, batch=None, metadata=metadata)
            onnx = load_artifact(onnx_path, ExportFormat.ONNX, threads=args.threads)
            sizes[(name, "onnxruntime-fp32")] = onnx_path.stat().st_size
            calibration = list(smooth_images(64, size, 1, prep).split(16))
            for batch in args.batch_size:
                fp32_path, int8_path = folder / f"{name}_b{batch}.pte", folder / f"{name}_b{batch}_int8.pte"
                # the verified float32 program `mobilenetv3 export` writes (BN folded, checked against float64)
                export_model(model, fp32_path, ExportFormat.EXECUTORCH, input_size=size, batch=batch,
                             metadata=metadata)
                report = quantize_to_pte(model, calibration, int8_path, metadata, batch=batch, min_agreement=0.0)
                sizes[(name, "executorch-fp32")] = fp32_path.stat().st_size
                sizes[(name, "executorch-int8")] = report.pte_bytes
                outside[name] = (report.outside_delegate, report.delegates)
                engines = {"onnxruntime-fp32": onnx, "executorch-fp32": load_pte(fp32_path, threads=args.threads),
                           "executorch-int8": load_pte(int8_path, threads=args.threads)}
                images = smooth_images(batch, size, 2, prep).numpy()
                calls = {engine: (lambda run=run: run(images)) for engine, run in engines.items()}
                times = time_interleaved(calls, device=torch.device("cpu"), warmup=3, min_repeats=args.repeats,
                                         min_seconds=args.min_time, clock=args.clock)
                medians = {engine: statistics.median(t) * 1e3 for engine, t in times.items()}
                for engine, ms in medians.items():
                    rows.append({"model": name, "engine": engine, "batch": batch, "median_ms": ms,
                                 "calls": len(times[engine]), "vs_onnxruntime": medians["onnxruntime-fp32"] / ms})
                reference = medians["onnxruntime-fp32"]
                print(f"{name} batch {batch}: " + "  ".join(
                    f"{engine} {ms:.2f} ms ({reference / ms:.2f}x)" for engine, ms in medians.items()),
                    file=sys.stderr, flush=True)
    print(f"{size}px, torch {torch.__version__}, threads {args.threads or 'default'}, {args.clock} clock, interleaved, "
          f">= {args.repeats} calls and >= {args.min_time:g} s per engine; "
          "'vs ORT' = ONNX Runtime fp32 median / engine median")
    print(f"{'model':<24} {'engine':<18} {'batch':>5} {'median ms':>10} {'vs ORT':>7}")
    for row in rows:
        print(f"{row['model']:<24} {row['engine']:<18} {row['batch']:>5} {row['median_ms']:>10.2f} "
              f"{row['vs_onnxruntime']:>6.2f}x")
    for name in args.models:
        fp32, int8 = sizes[(name, "executorch-fp32")], sizes[(name, "executorch-int8")]
        print(f"{name}: onnx {sizes[(name, 'onnxruntime-fp32')] / 1e6:.1f} MB, fp32 .pte {fp32 / 1e6:.1f} MB, "
              f"int8 .pte {int8 / 1e6:.1f} MB ({100 * int8 / fp32:.0f}% of fp32); int8 kernel calls outside the "
              f"delegate: {outside[name][0]} ({outside[name][1]} delegate call(s))")
    measured = {"rows": rows, "bytes": {f"{m}/{e}": b for (m, e), b in sizes.items()}}
    if args.json:
        print(json.dumps(measured))
    settings = {"input_size": size, "threads": args.threads, "clock": args.clock, "repeats": args.repeats,
                "min_time": args.min_time}
    results.record("mobile_speed", {**measured, **settings}, argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
