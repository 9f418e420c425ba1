"""Largest output difference between each peer MobileNetV3 and its conversion, both directions.

    .venv/bin/python benchmarks/peer_equivalence.py [--size 224] [--variants NAME ...]

For every torchvision / timm variant: random weights with BN statistics measured at the input size, then
perturbed (the test suite's `randomize`), eval mode, a random 2x3xSxS batch; prints (and appends to benchmarks/results/peer_equivalence.jsonl) max |peer - ours| in float32 and
float64, whether the conversion back reproduces every peer tensor bit for bit, and the output scale.
"float32" is ours as users run it (no_grad: CPU inference goes channels_last inside, so convolutions sum in
another order); "f32 NCHW" runs both with autograd on, which keeps ours in the peers' NCHW layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import results  # benchmarks/results.py: this script's folder is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_convert import build_double, peer_model, randomize  # noqa: E402  (the tests' reference setup)

from mobilenetv3.weights.convert import convert_state_dict, peer_variants, to_peer  # noqa: E402


def measure(peer: str, name: str, size: int) -> dict:
    reference = randomize(peer_model(peer, name), calibration_size=size)  # float64, eval
    original = reference.state_dict()
    ours = build_double(convert_state_dict(peer, name, original))
    inputs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.double)
    row = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            expected = reference.to(dtype)(inputs.to(dtype))
            row[str(dtype).split(".")[1]] = (expected - ours.to(dtype)(inputs.to(dtype))).abs().max().item()
        row["scale"] = expected.abs().max().item()
    with torch.enable_grad():  # ours in the peer's layout: the same kernels in the same order
        expected = reference.float()(inputs.float())
        row["float32_nchw"] = (expected - ours.float()(inputs.float())).abs().max().item()
    reference.double(), ours.double()  # the round trip is checked on the float64 tensors
    _, back = to_peer(peer, ours.config, ours.state_dict())
    row["round_trip_exact"] = list(back) == list(original) and all(torch.equal(back[k], original[k]) for k in original)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--variants", nargs="*", help="peer model names (default: all)")
    args = parser.parse_args()
    rows = []
    print(f"{'peer':12s} {'model':34s} {'float32':>9s} {'f32 NCHW':>9s} {'float64':>9s} {'|out| max':>9s}  back exact")
    for variant in peer_variants():
        if args.variants and variant.name not in args.variants:
            continue
        row = measure(variant.peer, variant.name, args.size)
        print(f"{variant.peer:12s} {variant.name:34s} {row['float32']:9.2e} {row['float32_nchw']:9.2e} {row['float64']:9.2e} "
              f"{row['scale']:9.3g}  {row['round_trip_exact']}")
        rows.append({"peer": variant.peer, "model": variant.name, **row})
    results.record("peer_equivalence", {"size": args.size, "rows": rows}, argv=sys.argv)


if __name__ == "__main__":
    main()
