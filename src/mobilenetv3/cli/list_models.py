"""List the registered model names (optionally filtered by a shell-style pattern)."""

from __future__ import annotations

import argparse

HELP = "list model names"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. '*small*'")


def run(args: argparse.Namespace) -> int:
    from ..models.registry import get_entry, list_models  # torch on use: `mobilenetv3 list --help` stays torch-free

    for name in list_models(args.pattern):
        print(f"{name:34s} {get_entry(name).description}")
    return 0
