"""Benchmark results as data: each run appends one JSON line, and docs/results.md is rendered from them.

Numbers typed into documents by hand drift from what the scripts measure; here every benchmark script calls
`record(...)` at the end of a run (one line in `benchmarks/results/<name>.jsonl`, with the machine, torch
version, commit and command that produced it), and `make results` rewrites

  - docs/results.md, one section per benchmark (the latest record of each setting it was run with), and
  - every block of the README (or another Markdown file passed with --readme) of the form

        <!-- results:NAME -->
        ...generated markdown...
        <!-- /results:NAME -->

    from the latest record of NAME.

`--check` (run by tests/test_results.py) writes nothing and fails when a file is out of date.

    .venv/bin/python benchmarks/results.py render [--check] [--readme README.md] [--docs docs/results.md]

A smoke run that should not touch the committed records sets `MOBILENETV3_RESULTS_DIR=/some/temp/folder`:
`record` then appends there (and `render` reads from there).  Benchmark scripts import this module as
`import results` (their own folder is on sys.path).
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
from typing import Callable, NamedTuple

HERE = Path(__file__).resolve().parent
# module-level so tests can point it at a temp folder; MOBILENETV3_RESULTS_DIR keeps smoke runs out of the records
RESULTS_DIR = Path(os.environ.get("MOBILENETV3_RESULTS_DIR") or HERE / "results")
DOCS = HERE.parent / "docs" / "results.md"
README = HERE.parent / "README.md"
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

    One `write` of a whole line, so a run killed meanwhile leaves at most one torn last line (which `records`
    skips).  The scripts call it last and say where the line went on stderr."""
    import torch  # here, not at module level: rendering (make results) does not need torch

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
    print(f"recorded in {path}; `make results` renders docs/results.md from it", file=sys.stderr)
    return path


def records(name: str) -> list[dict]:
    """Every parseable record of `name`, oldest first (a torn line from a killed run is skipped)."""
    path = RESULTS_DIR / f"{name}.jsonl"
    if not path.exists():
        return []
    parsed = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return parsed


def latest(name: str) -> dict | None:
    """The last parseable record of `name`, or None when there is none."""
    found = records(name)
    return found[-1] if found else None


# --- sections: name -> how its records become markdown -------------------------------------------------------


class Section(NamedTuple):  # (a NamedTuple: tests load this file without registering it as a module)
    name: str
    title: str
    command: str  # the command that records it (shown when there is no record yet)
    intro: str  # what it measures and the criterion, for docs/results.md
    body: Callable[[dict], str]  # metrics -> markdown
    key: Callable[[dict], object] | None = None  # record -> setting: docs shows the latest record of each setting
    #: several records' metrics -> one markdown body (one table for all settings), instead of one body each
    combined: Callable[[list[dict]], str] | None = None

    def render(self, rec: dict | None) -> str:
        """One record (or None) as markdown, with the no-data line or the provenance line."""
        if rec is None:
            return f"No results yet: run `{self.command}`."
        return self.body(rec["metrics"]).rstrip("\n") + "\n\n" + _provenance(rec)

    def render_all(self, shown: list[dict]) -> str:
        """The records `shown` picks, as markdown: one body each, or one `combined` body and their provenance."""
        if not shown:
            return self.render(None)
        if self.combined is None:
            return "\n\n".join(self.render(rec) for rec in shown)
        lines = "\n".join(f"- {_provenance(rec)}" for rec in shown)
        return self.combined([rec["metrics"] for rec in shown]).rstrip("\n") + "\n\n" + lines


    def shown(self, found: list[dict]) -> list[dict]:
        """The records docs/results.md shows: the latest one, or the latest of each setting (by first run)."""
        if not found:
            return []
        if self.key is None:
            return [found[-1]]
        by_setting: dict = {}
        for rec in found:
            setting = json.dumps(self.key(rec), sort_keys=True, default=str)
            by_setting[setting] = rec  # keeps the first run's position, the latest record
        return list(by_setting.values())


def _provenance(rec: dict) -> str:
    flags = ", ".join(rec["cpu_flags"]) or "no AVX2/AVX-512"
    return (f"_Measured {rec['date']} on {rec['cpu']} ({rec['cores']} cores; {flags}), torch {rec['torch']}, "
            f"commit {rec['commit']}, by `{rec['command']}`._")


SECTIONS: dict[str, Section] = {}


def renderer(name: str, command: str, title: str, intro: str, key: Callable[[dict], object] | None = None,
             combined: Callable[[list[dict]], str] | None = None):
    """Register `body(metrics) -> markdown` as benchmark NAME's section (in docs/results.md, in this order);
    with `combined`, the records of all its settings render as one body."""
    def register(body: Callable[[dict], str]):
        SECTIONS[name] = Section(name, title, command, " ".join(intro.split()), body, key, combined)
        return body
    return register


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _opt(value, fmt: str, unit: str = "") -> str:
    return "—" if value is None else format(value, fmt) + unit


def _command_key(rec: dict) -> str:
    """The record's command without the folders it wrote to: runs of one setting share it."""
    words = shlex.split(rec["command"])
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word in ("--output", "--work", "--workdir"):
            skip = True
            continue
        if not word.startswith(("--output=", "--work=", "--workdir=")):
            kept.append(word)
    return " ".join(kept)


@renderer("params_macs", "python benchmarks/params_macs.py", "Parameters and MACs against the paper", """
    `mobilenetv3 profile --markdown` for every width of Large and Small, the minimalistic variants, and the
    resolution rows of the paper's Table 9: parameters counted on the module, MACs = torch.utils.flop_counter's
    flops / 2, batch 1, 1000 classes, beside the paper's numbers in millions. The criterion: every cell within
    1M MACs and 0.1M parameters of the paper, and exact where a peer publishes a count (tests/test_models.py
    asserts both). The paper's Small x1.25 parameter count (3.6M) is inconsistent with its own 1024-wide head:
    the rules that reproduce every other cell give 3.2M, so that cell is left empty.""")
def _params_macs(metrics: dict) -> str:
    # the function `mobilenetv3 profile --markdown` prints with (torch-free: cli modules import torch lazily)
    from mobilenetv3.cli.profile import markdown_table

    return markdown_table(metrics["rows"])


@renderer("peer_equivalence", "python benchmarks/peer_equivalence.py --size 224", "Peer equivalence", """
    Every torchvision and timm MobileNetV3 variant: random weights with BN statistics measured on random data and
    then perturbed, eval mode, a random 2x3xSxS batch, converted and compared with the peer's own model.
    "float32 as run" is ours called under `torch.no_grad()` on an NCHW batch (CPU inference then computes in
    channels_last inside, so convolutions sum in another order); "float32 NCHW" runs both with autograd on,
    which keeps ours in the peer's layout; "back exact" is the conversion back reproducing every peer tensor bit
    for bit. tests/test_convert.py asserts <= 1e-4 for every variant on odd 37x29 inputs.""")
def _peer_equivalence(metrics: dict) -> str:
    return f"Input {metrics['size']}x{metrics['size']}.\n\n" + _table(
        ["peer", "variant", "float32 as run", "float32 NCHW", "float64", "max \\|out\\|", "back exact"],
        [[r["peer"], r["model"], f"{r['float32']:.1e}", f"{r['float32_nchw']:.1e}", f"{r['float64']:.1e}",
          f"{r['scale']:.3g}", "bit-exact" if r["round_trip_exact"] else "**differs**"]
         for r in metrics["rows"]])


@renderer("export_verification", "python benchmarks/export_verification.py", "Export verification", """
    The check every export runs (deploy/export.py): torchvision's mobilenet_v3_large with random weights and BN
    statistics from smooth photo-like images, exported to ONNX (BN folded) and run by ONNX Runtime on three kinds
    of input. The criterion: the artifact may be as inexact as float32 eager itself, max |onnx - float64| <=
    max(4 x max |eager float32 - float64|, 1e-4 x max(1, max |logit|)) ("new rule"), where the rule before it
    (float32 eager as the reference, "old rule") refused correct files.""")
def _export_verification(metrics: dict) -> str:
    return _table(
        ["inputs", "max \\|out\\|", "eager float32 err", "onnx err", "\\|onnx - eager32\\|", "old rule", "new rule"],
        [[r["inputs"], f"{r['scale']:.3g}", f"{r['eager_diff']:.3g}", f"{r['artifact_diff']:.3g}",
          f"{r['old_diff']:.3g}", f"{'pass' if r['old_pass'] else 'FAIL'} (<= {r['old_allowed']:.3g})",
          f"{'pass' if r['new_pass'] else 'FAIL'} (<= {r['new_allowed']:.3g})"]
         for r in metrics["rows"]])


@renderer("eager_speed", "python benchmarks/eager_speed.py --min-time 5 --repeats 20 --also-channels-last",
          "Eager inference against the peers", """
    Ours, torchvision's and timm's MobileNetV3 in plain eager PyTorch on the CPU, calls interleaved round-robin
    under `torch.inference_mode`, milliseconds per forward pass (median). "eager" is each module called on an
    NCHW batch, as users do; "channels-last" converts model and input for every network beforehand (the peers'
    best CPU layout). The criterion: ours at least as fast as the faster peer at batch 1 and 32, plain eager
    ("ours vs the faster peer" >= 1.00x).""",
          key=lambda rec: {k: v for k, v in rec["metrics"].items() if k not in ("rows", "verdicts")})
def _eager_speed(metrics: dict) -> str:
    rows = metrics["rows"]
    cells = []
    for ours in (r for r in rows if r["network"] == "ours"):
        peers = {r["network"]: r["median_ms"] for r in rows
                 if (r["engine"], r["batch_size"], r["mode"]) == (ours["engine"], ours["batch_size"], ours["mode"])}
        ratio = min(ours["speedup"].values()) if ours["speedup"] else None
        cells.append([str(ours["batch_size"]), ours["engine"], ours["mode"], f"{ours['median_ms']:.2f}",
                      _opt(peers.get("torchvision"), ".2f"), _opt(peers.get("timm"), ".2f"), _opt(ratio, ".2f", "x")])
    return (f"{metrics.get('model', 'mobilenetv3_large_100')}, {metrics.get('threads') or 'default'} threads, "
            f"{metrics.get('clock', 'wall')} clock.\n\n"
            + _table(["batch", "engine", "mode", "ours ms", "torchvision ms", "timm ms", "ours vs the faster peer"],
                     cells))


@renderer("train_step_speed", "python benchmarks/train_step_speed.py", "CPU training step: small-map convolutions",
          """
    Full SGD training steps (forward, backward, step) of one process, one thread, channels_last 1x28x28 batches
    with stem stride 1 (the Fashion-MNIST recipes' networks), the library's CPU routes for small-map
    convolutions on and off (docs/performance.md), alternating step by step; median ms per step of each
    contestant, and each one's ratio to the first. The criterion: the routes make the step faster where they
    apply.""",
          key=lambda rec: [rec["metrics"].get(k) for k in ("model", "batch_size", "threads", "input")])
def _train_step_speed(metrics: dict) -> str:
    timed = {k[len("median_ms_"):]: v for k, v in metrics.items() if k.startswith("median_ms_")}
    first = next(iter(timed.values()))
    return (f"{metrics['model']}, batch {metrics['batch_size']}, {metrics['threads']} thread(s), input "
            f"{'x'.join(map(str, metrics['input']))}, {metrics['steps']} timed steps each, CPU capability "
            f"{metrics.get('cpu_capability')}, routes used: {metrics.get('routes_used')}.\n\n"
            + _table(["contestant", "median ms per step", "vs the first"],
                     [[name, f"{ms:.1f}", f"{ms / first:.2f}x"] for name, ms in timed.items()]))


@renderer("small_conv_speed", "python benchmarks/small_conv_speed.py", "Small-map convolutions, layer by layer", """
    Forward + backward of each convolution that CPU training routes around oneDNN, found in a real network and
    timed every way round-robin: the route, the padded depthwise form (depthwise only) and the plain conv;
    median ms and the plain conv's ratio to the route (> 1: the route is faster). The criterion for each route's
    bound (docs/performance.md): the route is faster on every layer it takes.""",
          key=lambda rec: _command_key(rec))
def _small_conv_speed(metrics: dict) -> str:
    if not metrics.get("rows"):
        return metrics.get("note", "No routed layers.")
    timed = [k for k in dict.fromkeys(k for r in metrics["rows"] for k in r) if k.startswith(("median_ms_", "ratio_"))]
    header = [k[len("median_ms_"):] + " ms" if k.startswith("median_ms_") else k[len("ratio_"):].replace("_", " ")
              for k in timed]
    return _table(
        ["layer", "input", "output", "kernel", "stride", "route", *header],
        [[r["layer"], "x".join(map(str, r["input"])), "x".join(map(str, r["output"])),
          "x".join(map(str, r["kernel"])), "x".join(map(str, r["stride"])), r["route"],
          *[_opt(r.get(k), ".2f", "" if k.startswith("median_ms_") else "x") for k in timed]]
         for r in metrics["rows"]])


@renderer("route_ablation", "python benchmarks/route_ablation.py --min-time 10 --threads 1 --clock cpu "
          "[--keep-freed-memory]", "Inference CPU routes, each on against off", """
    Our eager network (BatchNorm calibrated) under `torch.inference_mode`, with every CPU route on and with one
    inference route switched off through `cpu_routes.routes(<route>=False)`, calls interleaved round-robin;
    median ms of each and the route's gain (off / on). The criterion (docs/performance.md): a route stays only
    while it makes the network more than 5% faster at some batch size.""",
          key=lambda rec: [rec["metrics"].get(k) for k in ("model", "threads", "clock", "keep_freed_memory")])
def _route_ablation(metrics: dict) -> str:
    return (f"{metrics['model']}, {metrics['threads']} thread(s), {metrics['clock']} clock, glibc keeps freed "
            f"memory: {'yes' if metrics['keep_freed_memory'] else 'no'}.\n\n"
            + _table(["batch", "route", "all on, ms", "route off, ms", "gain"],
                     [[str(r["batch_size"]), r["route"], f"{r['on_ms']:.2f}", f"{r['off_ms']:.2f}",
                       f"{r['gain']:.3f}x"] for r in metrics["rows"]]))


@renderer("train_speed", "python benchmarks/train_speed.py", "CPU training throughput: keep_freed_memory", """
    Real `mobilenetv3 train` runs of one epoch cut to a few steps (under torchrun with 2 processes by default),
    alternating `keep_freed_memory` on and off; training images/s of each trial and the ratio of the medians.
    The criterion: keeping freed memory (on by default in CPU training) is faster than glibc's default.""",
          key=lambda rec: _command_key(rec))
def _train_speed(metrics: dict) -> str:
    return _table(
        ["recipe", "processes", "steps per trial", "img/s, kept", "img/s, default malloc", "median ratio"],
        [[metrics["recipe"], str(metrics["processes"]), str(metrics["steps_per_trial"]),
          " / ".join(f"{v:.1f}" for v in metrics["images_per_s_on"]),
          " / ".join(f"{v:.1f}" for v in metrics["images_per_s_off"]), f"{metrics['median_ratio_on_over_off']:.2f}x"]])


@renderer("loader_speed", "python benchmarks/loader_speed.py", "Fashion-MNIST training batches", """
    One training batch of a Fashion-MNIST recipe's augmentation, the batched seeded path (per-image NumPy draws,
    then batched tensor ops) against reseeding torch's RNG and transforming image by image, round-robin in one
    process with one thread; median ms per batch. The criterion: the batched path is faster and draws each
    image's augmentation from that image's own seed.""",
          key=lambda rec: _command_key(rec))
def _loader_speed(metrics: dict) -> str:
    ms = metrics["ms_per_batch"]
    return _table(["recipe", "batch", "batched ms", "image by image ms", "speed-up"],
                  [[metrics["recipe"], str(metrics["batch_size"]), f"{ms['batched']:.2f}", f"{ms['per_image']:.2f}",
                    f"{metrics['speedup']:.1f}x"]])


@renderer("jpeg_loader", "python benchmarks/jpeg_loader.py", "ImageNet-style JPEG training input, per core", """
    Training batches of 64 from photo-like 500x375 JPEGs (quality 90), RandomResizedCrop(224) and a flip, in one
    process with one thread, one batch of each contestant in turn: torchvision's reference (`ImageFolder`, PIL,
    `transforms`, float normalised), `torchvision.io.decode_jpeg` with `transforms.v2` on uint8 tensors, ours as
    `train` loads them (float normalised on the CPU), and ours before that last step (uint8: what a loader core
    does when the GPU normalises). Images per second from the median batch, and the ratio to torchvision's. The
    target (issue 27): ours at least 1.5x torchvision's reference.""",
          key=lambda rec: [rec["metrics"].get(k) for k in ("clock", "batch_size", "overrides")])
def _jpeg_loader(metrics: dict) -> str:
    names = {"torchvision": "torchvision reference (PIL, transforms)", "decode_jpeg_v2": "decode_jpeg + v2",
             "ours": "ours, float32 normalised on the CPU", "ours_uint8": "ours, uint8 (normalised on the GPU)"}
    overrides = " ".join(f"`{o}`" for o in metrics["overrides"]) or "none"
    return (f"{metrics['images']} JPEGs of {metrics['size'][0]}x{metrics['size'][1]}, quality {metrics['quality']}, "
            f"batch {metrics['batch_size']}, {metrics['threads']} thread, {metrics['clock']} clock, our overrides: "
            f"{overrides}.\n\n"
            + _table(["pipeline", "img/s per core", "vs torchvision", "batches timed"],
                     [[names.get(name, name), f"{value:.0f}", f"{metrics['vs_torchvision'][name]:.2f}x",
                       str(metrics["batches_timed"][name])] for name, value in metrics["images_per_s"].items()]))


@renderer("predict_speed", "python benchmarks/predict_speed.py --repeats 3", "Whole-process predict", """
    `mobilenetv3 predict` against the plain script a torchvision user writes (PIL decode, Resize(256) /
    CenterCrop(224), batches of 32, eager mobilenet_v3_large), both timed as whole processes on the same
    synthetic JPEGs, alternating; torchvision's mobilenet_v3_large with calibrated random weights, converted
    with `mobilenetv3 convert`. The criterion: predict is faster than the user script and agrees with it on
    every top-1.""")
def _predict_speed(metrics: dict) -> str:
    cold = metrics.get("cold_predict_s")
    return (f"{metrics['images']} JPEGs of 320x240, {metrics['cpus']} CPUs, {metrics['repeats']} runs each; "
            f"{metrics.get('distinct_top1')} distinct top-1 classes"
            + ("" if cold is None else f"; the first predict run (ONNX export and cache fill) took {cold:.2f} s")
            + ".\n\n"
            + _table(["command", "median s", "img/s", "speed-up (median)", "fastest s", "speed-up (fastest)",
                      "top-1 agreement"],
                     [[r["command"], f"{r['wall_s']:.2f}", f"{metrics['images'] / r['wall_s']:.1f}",
                       f"{r['speedup']:.2f}x", f"{r['fastest_s']:.2f}", f"{r['speedup_fastest']:.2f}x",
                       f"{100 * r['top1_agreement']:.0f}%"] for r in metrics["rows"]]))


@renderer("mobile_speed", "python benchmarks/mobile_speed.py", "On-device engines: speed and size", """
    ONNX Runtime fp32 against ExecuTorch (XNNPACK) fp32 and int8 programs, in one process: random weights, BN
    statistics from smooth images, 224 px, calls interleaved, median; "vs" is ONNX Runtime fp32's median over
    the engine's (> 1: faster). The target: int8 >= 2.0x ONNX Runtime fp32 for Large at batch 1 and 32.""")
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


@renderer("quantization", "python benchmarks/quantization_accuracy.py", "What int8 costs", """
    `python benchmarks/quantization_accuracy.py --checkpoint CKPT --label NAME`: the float32 checkpoint,
    `quantize`'s PTQ program and a `train --qat` run's program, all run on the whole validation split in one
    process (the QAT lr is 0.05x the run's own). top-1 and agreement in percent, drop in points, as
    `mobilenetv3 quantize` reports them. One results file per label.""")
def _quantization(metrics: dict) -> str:
    return _table(
        ["model", "weights", "method", "top-1", "drop vs float32 (points)", "agreement with float32", ".pte size",
         "command"],
        [[r["model"], r["weights"], r["method"], f"{r['top1']:.2f}%", _opt(r["drop"], ".2f"),
          _opt(r["agreement"], ".2f", "%"),
          "—" if r["pte_bytes"] is None else f"{r['pte_bytes'] / 1e6:.1f} MB",
          f"`{r['command']}`"]
         for r in metrics["rows"]])


#: fashion-mnist-seg's classes, in its masks' order (background first), for the per-class IoU columns
_SEG_CLASSES = ("background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                "Bag", "Ankle boot")


@renderer("segmentation", "python benchmarks/segmentation.py --variant NAME", "Segmentation on fashion-mnist-seg", """
    A segmentation recipe (`fashion-mnist-seg`: LR-ASPP Large 1.0 on our 128x128 canvases of Fashion-MNIST items,
    not a public benchmark) trained to the end, one variant at a time with nothing else running: mIoU and pixel
    accuracy on the 1000 test canvases at the last epoch, per-class IoU, and the wall time. The target: >= 70%
    mIoU within 30 minutes on 2 CPU cores. `large-conv1x1` is the same backbone and schedule with a plain 1x1-conv
    head instead of LR-ASPP (the paper's claim that the head earns its place).""",
          key=lambda rec: rec["metrics"]["variant"], combined=lambda runs: _segmentation_runs(runs))
def _segmentation(metrics: dict) -> str:
    return _segmentation_runs([metrics])


def _segmentation_runs(runs: list[dict]) -> str:
    """One row per variant, then the per-class IoU of each."""
    summary = _table(
        ["variant", "overrides", "model", "params", "epochs", "mIoU", "pixel acc", "best mIoU (epoch)", "img/s",
         "wall min", "minutes to 70%"],
        [[m["variant"], " ".join(f"`{o}`" for o in m["overrides"]) or "—", m["model"] or "—",
          _opt(m["params"], ",d"), str(m["epochs"]), f"{m['last_miou']:.2f}%", f"{m['last_pixel_acc']:.2f}%",
          f"{m['best_miou']:.2f}% ({m['best_epoch']})", f"{m['train_images_per_s']:.0f}",
          f"{m['wall_time_s'] / 60:.1f}", _opt(m["minutes_to_70"], ".1f")] for m in runs])
    count = len(runs[0]["last_iou"])
    names = _SEG_CLASSES if count == len(_SEG_CLASSES) else tuple(str(i) for i in range(count))
    per_class = _table(["variant", *names], [[m["variant"], *(_opt(v, ".1f") for v in m["last_iou"])] for m in runs])
    return summary + "\n\nIoU per class (%), last epoch:\n\n" + per_class


@renderer("detection", "python benchmarks/detection.py --variant NAME", "Detection on fashion-mnist-det", """
    A detection recipe (`fashion-mnist-det`: SSDLite on MobileNetV3-Large 1.0 at 128x128, on our canvases of
    Fashion-MNIST items with a tight box each, not a public benchmark) trained to the end, one variant at a time
    with nothing else running: COCO box mAP@[.5:.95], mAP@.5 and mAP@.75 (pycocotools) on the 1000 test canvases
    at the last epoch, the best epoch, and the wall time on 2 CPU cores.""",
          key=lambda rec: rec["metrics"]["variant"], combined=lambda runs: _detection_runs(runs))
def _detection(metrics: dict) -> str:
    return _detection_runs([metrics])


def _detection_runs(runs: list[dict]) -> str:
    return _table(
        ["variant", "overrides", "model", "params", "epochs", "mAP", "mAP@.5", "mAP@.75", "best mAP (epoch)",
         "img/s", "wall min"],
        [[m["variant"], " ".join(f"`{o}`" for o in m["overrides"]) or "—", m["model"] or "—",
          _opt(m["params"], ",d"), str(m["epochs"]), f"{m['last_map']:.2f}%", f"{m['last_map_50']:.2f}%",
          f"{m['last_map_75']:.2f}%", f"{m['best_map']:.2f}% ({m['best_epoch']})",
          f"{m['train_images_per_s']:.0f}", f"{m['wall_time_s'] / 60:.1f}"] for m in runs])


@renderer("segmentation_latency", "python benchmarks/segmentation.py --latency", "Segmentation predict latency", """
    `predict` on a segmentation model, one image at a time, with its ONNX Runtime fp32 engine (the verified export
    with dynamic height and width): the engine call alone (median and p90 of repeated calls on one input) and the
    whole command's work per image (PNG decode, preprocessing, the engine, the mask and overlay PNGs written),
    at our 128x128 canvases and at 512x1024 (half of Cityscapes' 1024x2048).""")
def _segmentation_latency(metrics: dict) -> str:
    return _table(
        ["input", "size", "model", "weights", "engine median ms", "engine p90 ms", "predict ms per image",
         "images"],
        [[r["setting"], f"{r['height']}x{r['width']}x{r['in_chans']}", r["model"], r["weights"],
          f"{r['engine_ms_median']:.2f}", f"{r['engine_ms_p90']:.2f}", f"{r['predict_ms_per_image']:.1f}",
          str(r["images"])] for r in metrics["rows"]])


@renderer("fashion_mnist", "python benchmarks/fashion_mnist.py", "Fashion-MNIST runs", """
    A Fashion-MNIST recipe trained on this machine (the 10,000 official test images are the validation split):
    test top-1/top-5 and loss of the last epoch, the averaged models where the run kept them, flip-TTA top-1 with
    --tta (a separate, two-view protocol), and the wall time. The recipes' targets: 93% within 20 minutes
    (`fashion-mnist`), 95% within 60 minutes (`fashion-mnist-large`) on 2 CPU cores.""",
          key=lambda rec: _command_key(rec))
def _fashion_mnist(metrics: dict) -> str:
    averaged = ", ".join(f"{prefix.upper()} {metrics[f'{prefix}_test_top1']:.2f}%" for prefix in ("ema", "swa")
                         if f"{prefix}_test_top1" in metrics) or "—"
    tta = metrics.get("flip_tta_test_top1")
    return _table(
        ["recipe", "model", "epochs", "processes", "test top-1", "top-5", "loss", "averaged", "flip TTA", "wall s",
         "load avg"],
        [[metrics["recipe"], metrics["model"], str(metrics["epochs"]), str(metrics["processes"]),
          f"{metrics['test_top1']:.2f}%", f"{metrics['test_top5']:.2f}%", f"{metrics['test_loss']:.4f}", averaged,
          _opt(tta, ".2f", "%"), f"{metrics['wall_time_s']:.0f}", f"{metrics['load_average_1min']:.2f}"]])


@renderer("recipe_sweep", "python benchmarks/recipe_sweep.py --recipe RECIPE --variant ...", "Recipe sweeps", """
    Variants of one recipe trained side by side, one process each, until they finish or a deadline: test top-1
    of the last and the best epoch (benchmarks/gpu_recipe_sweep.sh runs it on a GPU).""",
          key=lambda rec: _command_key(rec))
def _recipe_sweep(metrics: dict) -> str:
    return f"Recipe `{metrics['recipe']}`.\n\n" + _table(
        ["variant", "overrides", "status", "epochs", "last top-1", "best top-1", "wall s"],
        [[r["variant"], " ".join(f"`{o}`" for o in r["overrides"]) or "—", r["status"], str(r["epochs"]),
          _opt(r["last_top1"], ".2f", "%"), _opt(r["best_top1"], ".2f", "%"), f"{r['wall_time_s']:.0f}"]
         for r in sorted(metrics["variants"], key=lambda r: -(r["last_top1"] or 0))])


@renderer("soak", "python benchmarks/soak.py", "Soak: SIGKILL and resume", """
    Start / SIGKILL / `--resume` cycles of a tiny deterministic training run plus evaluation, with kills at seeded
    random moments (some inside checkpoint writes), compared with one clean run. The criterion: last.pt readable
    after every kill and never older than before it, no temp files left, and everything equal to the clean run
    bit for bit.""",
          key=lambda rec: _command_key(rec))
def _soak(metrics: dict) -> str:
    shown = {k: v for k, v in metrics.items() if k != "workdir"}
    return _table(["key", "value"], [[k, f"`{json.dumps(v)}`"] for k, v in shown.items()])


def section_for(name: str) -> Section | None:
    """NAME's section; a name "BASE-VARIANT" (one benchmark recorded per variant, e.g. quantization-demo-small
    for one checkpoint) uses BASE's."""
    if name in SECTIONS:
        return SECTIONS[name]
    base = next((known for known in SECTIONS if name.startswith(known + "-")), None)
    return None if base is None else SECTIONS[base]


def renderer_for(name: str) -> Callable[[dict | None], str] | None:
    """The function that renders one record (or None) of NAME, for a README block."""
    section = section_for(name)
    return None if section is None else section.render


RENDERERS = {name: section.render for name, section in SECTIONS.items()}


# --- docs/results.md --------------------------------------------------------------------------------------------


def recorded_names(base: str) -> list[str]:
    """The results files of section `base`: BASE.jsonl and BASE-VARIANT.jsonl, sorted."""
    if not RESULTS_DIR.is_dir():
        return []
    names = sorted(p.stem for p in RESULTS_DIR.glob("*.jsonl"))
    return [n for n in names if n == base or (n.startswith(base + "-") and section_for(n) is SECTIONS[base])]


def render_docs_text() -> str:
    """The whole of docs/results.md, from the records."""
    parts = [
        "# Results",
        "",
        "<!-- Generated by `make results` (benchmarks/results.py) from benchmarks/results/*.jsonl: do not edit. -->",
        "",
        "Every benchmark script in `benchmarks/` appends one JSON line per run to `benchmarks/results/NAME.jsonl`: "
        "the commit, torch version, CPU and its SIMD flags, date, command and metrics. This page shows the latest "
        "record of each benchmark (and of each setting it was run with); the files keep every run. Rerun a "
        "command below, then `make results`. Set `MOBILENETV3_RESULTS_DIR` to a temporary folder for a run that "
        "should not be recorded.",
        "",
        "Results measured before they were kept as data (dated tables from earlier sessions, the H200 checks and "
        "the hour-long Fashion-MNIST runs) are in [history.md](history.md), unchanged.",
        "",
        "## Contents",
        "",
        *[f"- [{s.title}](#{_anchor(s.title)})" for s in SECTIONS.values()],
    ]
    for section in SECTIONS.values():
        parts += ["", f"## {section.title}", "", section.intro, ""]
        shown = [rec for name in recorded_names(section.name) for rec in section.shown(records(name))]
        parts.append(section.render_all(shown))
    return "\n".join(parts) + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def render_docs(docs_path: str | Path = DOCS, check: bool = False) -> bool:
    """Rewrite docs/results.md from the records; returns whether it changed (with `check`: was stale)."""
    path = Path(docs_path)
    text = render_docs_text()
    stale = not path.exists() or path.read_text(encoding="utf-8") != text
    if stale and not check:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return stale


# --- README blocks ----------------------------------------------------------------------------------------------

BLOCK = re.compile(r"^(<!-- results:(\S+) -->\n)(.*?)^(<!-- /results:\2 -->)$", flags=re.M | re.S)


def render_readme(readme_path: str | Path, check: bool = False) -> list[str]:
    """Rewrite every results block of a Markdown file from the latest records; returns the blocks that changed.

    With `check`, nothing is written: the returned names are the stale blocks."""
    path = Path(readme_path)
    text = path.read_text(encoding="utf-8")
    opened = re.findall(r"^<!-- results:(\S+) -->$", text, flags=re.M)
    closed = [m.group(2) for m in BLOCK.finditer(text)]
    if opened != closed:  # else an unclosed block would go unchecked
        raise ValueError(f"{path}: results blocks {', '.join(opened)} do not each end with <!-- /results:NAME -->")
    unknown = [n for n in closed if section_for(n) is None]
    if unknown:
        raise ValueError(f"{path}: unknown results blocks: {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    stale = []

    def replace(m: re.Match) -> str:
        section = section_for(m.group(2))
        content = "\n" + section.render_all(section.shown(records(m.group(2)))).strip("\n") + "\n\n"
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
    render = commands.add_parser("render", help="rewrite docs/results.md and the README's results blocks")
    render.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    render.add_argument("--readme", default=str(README))
    render.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args()
    stale = [f"{Path(args.readme).name} blocks {', '.join(names)}"
             for names in [render_readme(args.readme, check=args.check)] if names]
    if render_docs(args.docs, check=args.check):
        stale.append(str(Path(args.docs).name))
    if args.check and stale:
        print(f"out of date: {'; '.join(stale)}; run `make results`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
