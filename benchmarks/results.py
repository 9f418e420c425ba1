"""Benchmark results as data: each run appends one JSON line, and the README's tables are rendered from them.

Numbers typed into the README by hand drift from what the scripts measure; here a benchmark script calls
`record(...)` at the end of every run (one line in `benchmarks/results/<name>.jsonl`, with the machine, torch
version, commit and command that produced it), and `make results` rewrites each README block

    <!-- results:NAME -->
    ...generated markdown...
    <!-- /results:NAME -->

from the latest record of NAME.  `--check` (run by tests/test_results.py) fails when a block is out of date.

    .venv/bin/python benchmarks/results.py render [--check] [--readme README.md]

Benchmark scripts import it as `import results` (their own folder is on sys.path).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"  # module-level so tests can point it at a temp folder
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")  # the ones that change int8 / fp32 kernel speed


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()


def _commit() -> str | None:
    """Short HEAD, "-dirty" when tracked files differ from it (the numbers may not be HEAD's)."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu() -> tuple[str | None, list[str]]:
    """Model name and the SIMD flags that matter from /proc/cpuinfo; (None, []) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    model = re.search(r"^model name\s*:\s*(.*)$", text, flags=re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, flags=re.M)
    present = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else None), sorted(f for f in CPU_FLAGS if f in present)


def record(name: str, metrics: dict, *, argv: list[str] | None = None) -> Path:
    """Append one run of benchmark `name` to its .jsonl file; returns the file.

    One `write` of a whole line, so a run killed meanwhile leaves at most one torn last line (which `latest`
    skips).  torch is imported here, not at module level, so rendering does not need it."""
    import torch

    cpu, flags = _cpu()
    line = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "command": "python " + shlex.join(argv or sys.argv),
        "metrics": metrics,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return path


def latest(name: str) -> dict | None:
    """The last parseable record of `name`, or None when there is none."""
    path = RESULTS_DIR / f"{name}.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


# --- renderers: name -> function(record or None) -> markdown ---------------------------------------------------

RENDERERS: dict[str, Callable[[dict | None], str]] = {}


def renderer(name: str, command: str):
    """Register `body(metrics) -> markdown` as NAME's renderer, adding the no-data line and the provenance line."""
    def register(body: Callable[[dict], str]):
        def render(rec: dict | None) -> str:
            if rec is None:
                return f"No results yet: run `{command}`."
            flags = ", ".join(rec["cpu_flags"]) or "no AVX2/AVX-512"
            return (body(rec["metrics"]).rstrip("\n") + "\n\n"
                    f"_Measured {rec['date']} on {rec['cpu']} ({rec['cores']} cores; {flags}), torch {rec['torch']}, "
                    f"commit {rec['commit']}, by `{rec['command']}`._")
        RENDERERS[name] = render
        return body
    return register


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


@renderer("mobile_speed", "python benchmarks/mobile_speed.py")
def _mobile_speed(metrics: dict) -> str:
    table = _table(["model", "engine", "batch", "median ms", "vs ONNX Runtime fp32"],
                   [[r["model"], r["engine"], str(r["batch"]), f"{r['median_ms']:.2f}", f"{r['vs_onnxruntime']:.2f}x"]
                    for r in metrics["rows"]])
    sizes = metrics["bytes"]
    lines = []
    for model in dict.fromkeys(r["model"] for r in metrics["rows"]):
        fp32, int8 = sizes[f"{model}/executorch-fp32"], sizes[f"{model}/executorch-int8"]
        lines.append(f"- {model}: fp32 .pte {fp32 / 1e6:.1f} MB, int8 .pte {int8 / 1e6:.1f} MB "
                     f"({100 * int8 / fp32:.0f}% of fp32)")
    return table + "\n\n" + "\n".join(lines)


@renderer("quantization", "python benchmarks/quantization_accuracy.py")
def _quantization(metrics: dict) -> str:
    """top1 and agreement in percent, drop in points, as `mobilenetv3 quantize` reports them."""
    def opt(value, fmt: str, unit: str = "") -> str:
        return "—" if value is None else format(value, fmt) + unit

    return _table(
        ["model", "weights", "method", "top-1", "drop vs float32 (points)", "agreement with float32", ".pte size",
         "command"],
        [[r["model"], r["weights"], r["method"], f"{r['top1']:.2f}%", opt(r["drop"], ".2f"),
          opt(r["agreement"], ".2f", "%"),
          "—" if r["pte_bytes"] is None else f"{r['pte_bytes'] / 1e6:.1f} MB",
          f"`{r['command']}`"]
         for r in metrics["rows"]])


def renderer_for(name: str) -> Callable[[dict | None], str] | None:
    """NAME's renderer; a name "BASE-VARIANT" (one benchmark recorded per variant, e.g. quantization-demo for
    one checkpoint) uses BASE's."""
    if name in RENDERERS:
        return RENDERERS[name]
    base = next((known for known in RENDERERS if name.startswith(known + "-")), None)
    return None if base is None else RENDERERS[base]


# --- the README ------------------------------------------------------------------------------------------------

BLOCK = re.compile(r"^(<!-- results:(\S+) -->\n)(.*?)^(<!-- /results:\2 -->)$", flags=re.M | re.S)


def render_readme(readme_path: str | Path, check: bool = False) -> list[str]:
    """Rewrite every results block of the README from the latest records; returns the blocks that changed.

    With `check`, nothing is written: the returned names are the stale blocks."""
    path = Path(readme_path)
    text = path.read_text(encoding="utf-8")
    opened = re.findall(r"^<!-- results:(\S+) -->$", text, flags=re.M)
    closed = [m.group(2) for m in BLOCK.finditer(text)]
    if opened != closed:  # else an unclosed block would go unchecked
        raise ValueError(f"{path}: results blocks {', '.join(opened)} do not each end with <!-- /results:NAME -->")
    unknown = [n for n in closed if renderer_for(n) is None]
    if unknown:
        raise ValueError(f"{path}: unknown results blocks: {', '.join(unknown)} (known: {', '.join(RENDERERS)})")
    stale = []

    def replace(m: re.Match) -> str:
        content = "\n" + renderer_for(m.group(2))(latest(m.group(2))).strip("\n") + "\n\n"
        if content != m.group(3):
            stale.append(m.group(2))
        return m.group(1) + content + m.group(4)

    new = BLOCK.sub(replace, text)
    if not check and new != text:
        path.write_text(new, encoding="utf-8")
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="rewrite the README's results blocks from benchmarks/results/")
    render.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is out of date")
    render.add_argument("--readme", default=str(HERE.parent / "README.md"))
    args = parser.parse_args()
    names = render_readme(args.readme, check=args.check)
    if args.check and names:
        print(f"{Path(args.readme).name} results blocks out of date: {', '.join(names)}; run `make results`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
