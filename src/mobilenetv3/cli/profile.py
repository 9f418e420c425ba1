"""Print parameters and multiply-adds (torch.utils.flop_counter) beside the paper's numbers.

MACs are multiply-adds of one image; the paper's columns are millions, from Table 9 and its text.
"""

from __future__ import annotations

import argparse
import json

from ..errors import UserError

HELP = "params and MACs per model, beside the paper's"

DEFAULT_MODELS = [
    f"mobilenetv3_{arch}_{width}" for arch in ("large", "small") for width in ("125", "100", "075", "050", "035")
] + ["mobilenetv3_large_minimal_100", "mobilenetv3_small_minimal_100"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", default=None, metavar="NAME",
                        help="model names (default: every width of Large and Small, and the minimal ones)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[224], metavar="R",
                        help="input resolution(s) (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, metavar="N",
                        help="classifier outputs (default 1000, as the paper's ImageNet counts)")
    parser.add_argument("--in-chans", type=int, default=3, metavar="C",
                        help="input channels (default 3; 1 for greyscale)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per model and resolution")
    output.add_argument("--markdown", action="store_true",
                        help="a Markdown table (what benchmarks/params_macs.py records for docs/results.md)")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """`profile --markdown`: one row per model and resolution (the `Profile.to_dict()` fields), the paper beside.

    Torch-free, so that `make results` renders the recorded rows with the same function."""
    lines = ["| model | resolution | params | params (paper, M) | MACs (M) | MACs (paper, M) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['resolution']} | {row['params']:,d} | {_fmt(row['paper_params'])} | "
                     f"{row['macs'] / 1e6:.1f} | {_fmt(row['paper_macs'], 0)} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..profile import profile_model  # torch on use: `mobilenetv3 profile --help` stays torch-free

    if any(r < 32 for r in args.resolution):
        raise UserError("--resolution must be at least 32")
    rows = [
        profile_model(name, resolution, num_classes=args.num_classes, in_chans=args.in_chans)
        for name in (args.model or DEFAULT_MODELS)
        for resolution in args.resolution
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row.to_dict()))
        return 0
    if args.markdown:
        print(markdown_table([row.to_dict() for row in rows]))
        return 0
    print(f"{'model':32s} {'res':>4s} {'params':>11s} {'paper (M)':>9s} {'MACs (M)':>9s} {'paper (M)':>9s}")
    for row in rows:
        print(
            f"{row.model:32s} {row.resolution:4d} {row.params:11,d} {_fmt(row.paper_params):>9s} "
            f"{row.macs / 1e6:9.1f} {_fmt(row.paper_macs, 0):>9s}"
        )
    return 0
