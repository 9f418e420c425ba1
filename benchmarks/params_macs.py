"""Parameters and multiply-adds of every paper network beside the paper's numbers, recorded for docs/results.md.

The rows `mobilenetv3 profile --markdown` prints for every width of Large and Small and the minimalistic
variants at 224 px, plus the resolution rows of the paper's Table 9 (Large 1.0 at 256-96, Small 1.0 at
256-96).  Deterministic: it counts, it does not time.  Appends one line to benchmarks/results/params_macs.jsonl.

    .venv/bin/python benchmarks/params_macs.py
"""

from __future__ import annotations

import argparse
import sys

import results  # benchmarks/results.py: this script's folder is on sys.path

from mobilenetv3.cli.profile import DEFAULT_MODELS, markdown_table
from mobilenetv3.profile import profile_model

RESOLUTION_ROWS = [("mobilenetv3_large_100", (256, 192, 160, 128, 96)), ("mobilenetv3_small_100", (256, 160, 128, 96))]


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    rows = [profile_model(name, 224).to_dict() for name in DEFAULT_MODELS]
    rows += [profile_model(name, resolution).to_dict() for name, resolutions in RESOLUTION_ROWS
             for resolution in resolutions]
    print(markdown_table(rows))
    results.record("params_macs", {"rows": rows}, argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
