"""Each inference CPU route of `mobilenetv3.cpu_routes`, on against off, side by side in one interleaved run.

A route stays only while it earns its place (docs/performance.md): the eager network more than 5% faster with it
than without.  For each batch size this script times our network (BatchNorm statistics calibrated as in
`benchmarks/eager_speed.py`) with every route on ("all on") and with one inference route switched off through the
public switch (`cpu_routes.routes(<route>=False)`), calls interleaved round-robin under `torch.inference_mode`,
and reports each route's gain: the median with it off divided by the median with it on (1.05 = 5% faster with
the route).  `--keep-freed-memory` times it with glibc keeping freed memory (`mobilenetv3.allocator`), where
allocating a fresh feature map is cheap.  Every run is appended to benchmarks/results/route_ablation.jsonl;
`make results` renders it into docs/results.md.

    .venv/bin/python benchmarks/route_ablation.py [--model mobilenetv3_large_100] [--batch-size 1 32]
        [--min-time 10] [--threads 1] [--clock cpu] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import results  # benchmarks/results.py: this script's folder is on sys.path
from mobilenetv3 import cpu_routes, create_model
from mobilenetv3.timing import CLOCKS, calibrate_batchnorm, time_interleaved

INFERENCE_ROUTES = ("channels_last", "inplace_batchnorm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv3_large_100")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--min-time", type=float, default=10.0, help="least timed seconds per setting and batch size")
    parser.add_argument("--repeats", type=int, default=20, help="least timed calls per setting and batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=CLOCKS, default="cpu",
                        help="cpu: process CPU seconds, robust to other load on a shared machine (with --threads 1)")
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc malloc keeps freed memory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    if args.keep_freed_memory:
        from mobilenetv3.allocator import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    calibrate_batchnorm(model, torch.randn(8, 3, args.resolution, args.resolution,
                                           generator=torch.Generator().manual_seed(0)))
    rows = []
    for batch in args.batch_size:
        images = torch.randn(batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1))

        def call(**switch):
            def fn():
                with cpu_routes.routes(**switch), torch.inference_mode():
                    model(images)
            return fn

        fns = {"all on": call(), **{f"{route} off": call(**{route: False}) for route in INFERENCE_ROUTES}}
        times = time_interleaved(fns, device=torch.device("cpu"), warmup=3, min_repeats=args.repeats,
                                 min_seconds=args.min_time, clock=args.clock)
        medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        for route in INFERENCE_ROUTES:
            rows.append({"batch_size": batch, "route": route, "on_ms": medians["all on"],
                         "off_ms": medians[f"{route} off"], "gain": medians[f"{route} off"] / medians["all on"],
                         "calls": min(len(times["all on"]), len(times[f"{route} off"]))})
    measured = {"model": args.model, "resolution": args.resolution, "threads": args.threads, "clock": args.clock,
                "keep_freed_memory": args.keep_freed_memory, "torch": torch.__version__, "rows": rows}
    results.record("route_ablation", measured, argv=sys.argv)
    if args.json:
        print(json.dumps(measured, indent=2))
    else:
        print(f"{args.model}, {args.threads} thread(s), {args.clock} clock, keep_freed_memory={args.keep_freed_memory}")
        for row in rows:
            print(f"batch {row['batch_size']:3d}  {row['route']:18s} on {row['on_ms']:8.2f} ms  "
                  f"off {row['off_ms']:8.2f} ms  gain {row['gain']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
