"""Print parameters and multiply-adds (torch.utils.flop_counter) beside the paper's numbers.

MACs are multiply-adds of one image; the paper's columns are millions, from Table 9 and its text.
Segmentation models take any height x width, e.g.

  mobilenetv3 profile --model lraspp_mobilenetv3_large_100 lraspp_mobilenetv3_small_100 --resolution 512x1024
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
    parser.add_argument("--resolution", nargs="+", default=None, metavar="R",
                        help="input resolution(s), each N (NxN) or HEIGHTxWIDTH, e.g. 224 160 or 512x1024 "
                             "(default 224; a detector's own size, 320 for ssdlite320_*)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="classifier outputs (default: the model's own, 1000 as the paper's ImageNet counts, "
                             "21 for the LR-ASPP segmentation models, 91 for the SSDLite detectors)")
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


def _resolutions(values: list[str] | None) -> list[tuple[int, int]]:
    """(height, width) per requested input, each "N" or "HxW"."""
    values = values or ["224"]
    sizes = []
    for value in values:
        height, _, width = value.lower().partition("x")
        if not height.isdigit() or not (width.isdigit() or not width):
            raise UserError(f"--resolution takes N or HEIGHTxWIDTH (e.g. 224, 512x1024), got {value!r}")
        sizes.append((int(height), int(width or height)))
    if any(min(size) < 32 for size in sizes):
        raise UserError("--resolution must be at least 32")
    return sizes


def run(args: argparse.Namespace) -> int:
    from ..profile import profile_model  # torch on use: `mobilenetv3 profile --help` stays torch-free

    sizes = _resolutions(args.resolution) if args.resolution else [None]  # None: 224, or a detector's size
    heads = {} if args.num_classes is None else {"num_classes": args.num_classes}
    rows = [
        profile_model(name, resolution, in_chans=args.in_chans, **heads)
        for name in (args.model or DEFAULT_MODELS)
        for resolution in sizes
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row.to_dict()))
        return 0
    if args.markdown:
        print(markdown_table([row.to_dict() for row in rows]))
        return 0
    print(f"{'model':32s} {'res':>9s} {'params':>11s} {'paper (M)':>9s} {'MACs (M)':>9s} {'paper (M)':>9s}")
    for row in rows:
        print(
            f"{row.model:32s} {str(row.resolution):>9s} {row.params:11,d} {_fmt(row.paper_params):>9s} "
            f"{row.macs / 1e6:9.1f} {_fmt(row.paper_macs, 0):>9s}"
        )
    return 0
