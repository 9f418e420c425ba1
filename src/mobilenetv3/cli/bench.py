"""Latency (median, p90) and throughput per engine and batch size, beside torchvision and timm.

Networks run interleaved after a warm-up; each gets BatchNorm statistics calibrated on the same
random batch.  "% peak" is the share of this machine's measured matmul FLOP/s; "vs PEER" is the
peer's median latency divided by ours (above 1: we are faster), measured in the same run.  On a GPU
the calls are timed with CUDA events and the default engines add channels_last, AMP (bf16, fp16) and
torch.compile.  --train adds img/s of forward + backward + SGD step.

On the CPU, engine executorch times a verified float32 XNNPACK ExecuTorch program of our network and
executorch-int8 an int8 one (PT2E quantization, calibrated on the same in-range batch as the BatchNorm
statistics); both need pip install 'mobilenetv3[mobile]', and export one program per batch size (fixed).

examples:
  mobilenetv3 bench --model mobilenetv3_large_100 --compare torchvision,timm
  mobilenetv3 bench --model mobilenetv3_small_100 --batch-size 1 8 64 --engines eager,compile,onnxruntime --json
  mobilenetv3 bench --model mobilenetv3_large_100 --batch-size 32 --train --compare torchvision,timm
  mobilenetv3 bench --model mobilenetv3_large_100 --engines onnxruntime,executorch,executorch-int8
"""

from __future__ import annotations

import argparse
import json

from ..allocator import keep_freed_memory
from ..errors import UserError

HELP = "latency / throughput per engine and batch size, vs torchvision and timm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME", help="a registered model name")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32], metavar="N", help="default: 1 32")
    parser.add_argument("--engines", default=None,
                        help="comma-separated: eager, channels-last (model and input converted "
                             "by the caller, for every network), compile, onnxruntime, executorch, executorch-int8 "
                             "(CPU only); on a GPU also amp-bf16, amp-fp16 (default CPU: eager,onnxruntime; "
                             "GPU: all torch engines)")
    parser.add_argument("--compare", default="", help="comma-separated peers: torchvision,timm")
    parser.add_argument("--train", action="store_true", help="also time forward + backward + SGD step (eager)")
    parser.add_argument("--resolution", type=int, default=224, metavar="R", help="square input size (default 224)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per network (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="least timed calls per network (default 10)")
    parser.add_argument("--min-time", type=float, default=1.0, help="least timed seconds per network (default 1)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall (default) or cpu: this process's CPU seconds, for a shared machine (with --threads 1)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory (no page faults per forward; see mobilenetv3/allocator.py); "
                             "applies to every network alike")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: `bench --help` builds this parser without torch

    from ..deploy.bench import benchmark, format_table  # torch too

    if args.resolution < 32:
        raise UserError("--resolution must be at least 32")
    if args.warmup < 0 or args.repeats < 1:
        raise UserError("--warmup must be >= 0 and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    rows = benchmark(
        args.model, batch_sizes=args.batch_size, engines=_split(args.engines) or None, compare=_split(args.compare),
        train=args.train, resolution=args.resolution, device=args.device, warmup=args.warmup,
        min_repeats=args.repeats, min_seconds=args.min_time, clock=args.clock,
    )
    if args.json:
        for row in rows:
            print(json.dumps(row.to_dict()))
    else:
        print(f"{args.model} at {args.resolution}x{args.resolution}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {args.clock} clock"
              f"{', malloc keeps freed memory' if args.keep_freed_memory else ''}")
        print(format_table(rows))
    return 0
