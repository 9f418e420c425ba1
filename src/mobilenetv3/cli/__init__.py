"""`mobilenetv3 <command>`: the only place that reads argv.

Each command is a module of this package with `HELP`, `add_arguments(parser)` and `run(args) -> int`;
the library code it calls never sees argparse.  A `UserError` becomes one line on stderr and exit 2.
A reader that goes away (`mobilenetv3 predict ... | head -1`) ends the command quietly, as it ends Unix
tools: no traceback, exit status 141 (128 + SIGPIPE, what a shell reports for a tool killed by it).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import select
import sys
from importlib import metadata

from .. import __version__
from ..errors import UserError

#: Subcommands, in the order `--help` lists them (module = name with '-' -> '_', except where
#: the name would shadow a builtin inside this package: `list` lives in `list_models`).
COMMANDS = ("list", "profile", "train", "eval", "average", "lr-find", "convert", "export", "quantize", "predict", "bench",
            "bench-loader")
_MODULES = {"list": "list_models"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only` (a command name), only that command's module is imported
    (the others get bare subparsers), so a command's start-up does not pay for every other's imports."""
    parser = argparse.ArgumentParser(
        prog="mobilenetv3", description="MobileNetV3 for PyTorch: build, convert, train, evaluate, export, deploy."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-V", "--version", action="version", version=version_line(),
                        help="print the versions of mobilenetv3, torch and torchvision, and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if only in COMMANDS and name != only:
            commands.add_parser(name)
            continue
        module = importlib.import_module(f"{__name__}.{_MODULES.get(name, name.replace('-', '_'))}")
        sub = commands.add_parser(
            name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(run_command=module.run)
    return parser


def version_line() -> str:
    """`mobilenetv3 X (torch Y, torchvision Z, python W)`, read from the installed metadata: no torch import."""
    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    python = ".".join(str(part) for part in sys.version_info[:3])
    return (f"mobilenetv3 {__version__} (torch {installed('torch')}, torchvision {installed('torchvision')}, "
            f"python {python})")


def _reader_of_stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (Linux and macOS poll report POLLERR for it), as
    opposed to an EPIPE from some other pipe or socket (a DataLoader queue, a process group), which is a bug
    to show, not a reason to end quietly."""
    if not hasattr(select, "poll"):  # Windows: no way to ask, so trust the error
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # stdout is no real file (replaced in-process): the EPIPE came from elsewhere
        return False


def _stdout_gone() -> int:
    """The reader of stdout went away: point stdout at /dev/null, so that the interpreter's final flush of
    what is still buffered does not fail a second time ("Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout closed or not a real file (pytest's capture)
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        except SystemExit:  # --help, --version and usage errors print, then exit through here
            sys.stdout.flush()
            raise
    except BrokenPipeError:
        if not _reader_of_stdout_gone():
            raise
        return _stdout_gone()


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(only=next((arg for arg in argv if not arg.startswith("-")), None))
    except UserError as error:  # read while a command module is imported, e.g. a bad MOBILENETV3_CPU_ROUTES
        print(f"mobilenetv3: error: {_one_line(error)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    # Only rank 0 of a torchrun job logs at INFO; the others keep warnings and errors.
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        status = int(args.run_command(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that is gone fails here, not at interpreter exit
        return status
    except UserError as error:
        print(f"mobilenetv3 {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno == errno.EPIPE and _reader_of_stdout_gone():  # also when re-raised as a plain OSError
            return _stdout_gone()
        if error.errno != errno.ENOSPC:
            raise
        where = f" while writing {error.filename}" if error.filename else ""
        print(f"mobilenetv3 {args.command}: error: no space left on device{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobilenetv3 {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(error: UserError) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        return lines[-1].split("UserError: ", 1)[-1]
    return " ".join(line.strip() for line in lines)
