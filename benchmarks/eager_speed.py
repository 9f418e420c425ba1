"""Our MobileNetV3-Large in plain eager PyTorch against torchvision's and timm's, in one interleaved run.

The three networks have the same tensors (equal parameter counts; `tests/test_bench.py` checks it), so any
speed gap is implementation overhead.  Each gets BatchNorm statistics calibrated on the same random batch
(fresh networks drift into denormal floats, which would time the initialisation rather than the code).
Calls run round-robin (ours, torchvision, timm, ours, ...) after a warm-up, under `torch.inference_mode`.

The target: ours at least as fast as the faster peer at batch 1 and at batch 32.  "ratio" is
the faster peer's median latency divided by ours (>= 1.00 meets the target).  Every run is appended to
benchmarks/results/eager_speed.jsonl; `make results` renders it into docs/results.md.

    .venv/bin/python benchmarks/eager_speed.py [--model mobilenetv3_large_100] [--min-time 10] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

import results  # benchmarks/results.py: this script's folder is on sys.path
from mobilenetv3.deploy.bench import benchmark, format_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv3_large_100")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--min-time", type=float, default=10.0, help="least timed seconds per network and batch size")
    parser.add_argument("--repeats", type=int, default=20, help="least timed calls per network and batch size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU seconds, robust to other load on a shared machine (use --threads 1)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory (mobilenetv3.allocator), for all three alike")
    parser.add_argument("--also-channels-last", action="store_true",
                        help="also time every network with model and input converted to channels_last by the caller "
                             "(the peers' best CPU layout; ours does this itself in eager inference)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from mobilenetv3.allocator import keep_freed_memory

        keep_freed_memory()

    engines = ("eager", "channels-last") if args.also_channels_last else ("eager",)
    rows = benchmark(args.model, batch_sizes=args.batch_size, engines=engines, compare=("torchvision", "timm"),
                     warmup=5, min_repeats=args.repeats, min_seconds=args.min_time, device="cpu", clock=args.clock)
    print(f"{args.model}, eager CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"{'malloc keeps freed memory' if args.keep_freed_memory else 'default malloc'}, "
          f"interleaved, >= {args.repeats} calls and >= {args.min_time:g} s per network and batch size")
    print(format_table(rows))
    verdicts = []
    for row in (r for r in rows if r.network == "ours" and r.engine == "eager"):
        faster_peer = min(row.speedup, key=row.speedup.get)
        ratio = row.speedup[faster_peer]
        verdicts.append({"batch_size": row.batch_size, "faster_peer": faster_peer, "ratio": ratio, "meets": ratio >= 1.0})
        print(f"batch {row.batch_size:3d}: ours vs the faster peer ({faster_peer}), plain eager: {ratio:.2f}x "
              f"({'meets' if ratio >= 1.0 else 'MISSES'} the target)")
    measured = {"rows": [r.to_dict() for r in rows], "verdicts": verdicts}
    if args.json:
        print(json.dumps(measured))
    results.record("eager_speed", {**measured, "model": args.model, "batch_sizes": args.batch_size,
                                   "threads": torch.get_num_threads(), "clock": args.clock,
                                   "keep_freed_memory": args.keep_freed_memory, "min_time": args.min_time,
                                   "repeats": args.repeats}, argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
