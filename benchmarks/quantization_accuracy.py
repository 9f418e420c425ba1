"""What int8 costs in accuracy: float32 vs post-training quantization (PTQ) vs quantization-aware training (QAT).

For one trained checkpoint (a `mobilenetv3 train` run's, e.g. the demo's runs/demo/checkpoints/best.pt or the
fashion-mnist-large recipe's), this runs the two commands a user would:

  PTQ: mobilenetv3 quantize --checkpoint CKPT --output ptq.pte
  QAT: [torchrun --nproc_per_node N -m] mobilenetv3 train --config RUN/config.yaml --pretrained CKPT --qat
           --epochs E --lr LR --output qat   (its checkpoints/int8.pte)

then runs the float32 model and both int8 programs (ExecuTorch's runtime) on the data's whole validation split
in this process: top-1 of each, the drop from float32 in points, and the fraction of images on which the int8
program's top-1 class is float32's ("agreement").  QAT runs the run's own config (schedule, augmentation) for
E epochs at LR_SCALE x its learning rate; with E > 1 the quantization ranges freeze after the first epoch.  The rows are printed, and recorded in benchmarks/results/quantization-LABEL.jsonl (`make results`
renders them into docs/results.md).

    .venv/bin/python benchmarks/quantization_accuracy.py --checkpoint runs/demo/checkpoints/best.pt
        [--qat-epochs 2] [--lr-scale 0.05] [--nproc-per-node 1] [--label NAME] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import results


def command_line(argv: list[str]) -> str:
    return shlex.join(argv)


def run(argv: list[str], env: dict[str, str]) -> None:
    print("$", command_line(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (its run folder has config.yaml)")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--lr-scale", type=float, default=0.05, help="QAT lr = this x the run's lr (0.05)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="QAT under torchrun with N processes")
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--label", default=None,
                        help="the weights' name in the table and results file (default: the run folder's name)")
    parser.add_argument("--work", default=None, help="where the programs and the QAT run go (default: a temp dir)")
    args = parser.parse_args()

    import torch

    from mobilenetv3.deploy.executorch import load_pte, require_quantization
    from mobilenetv3.deploy.quantize import compare_program, evaluation_batches, quantize_data
    from mobilenetv3.weights.io import build_model, read_weights

    require_quantization("benchmarks/quantization_accuracy.py")
    checkpoint = Path(args.checkpoint).resolve()
    run_folder = checkpoint.parent.parent
    weights = read_weights(checkpoint)
    config = weights.extra.get("config") or {}
    if not (run_folder / "config.yaml").is_file() or not config:
        parser.error(f"{checkpoint} is not a checkpoint of a run folder with config.yaml")
    label = args.label or run_folder.name
    if not label.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--label {label!r}: letters, digits, - and _ only (it names the results file)")
    work = Path(args.work or tempfile.mkdtemp(prefix="quantization-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    python = [sys.executable, "-m", "mobilenetv3"]
    if args.nproc_per_node > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={args.nproc_per_node}", "-m", "mobilenetv3"]
    else:
        launcher = python

    ptq = work / "ptq_int8.pte"
    ptq_command = [*python, "quantize", "--checkpoint", str(checkpoint), "--output", str(ptq),
                   "--calibration-images", str(args.calibration_images)]
    run(ptq_command, env)

    qat_lr = args.lr_scale * float(config["optim"]["lr"])
    qat_output = work / "qat"
    qat_command = [*launcher, "train", "--config", str(run_folder / "config.yaml"), "--pretrained", str(checkpoint),
                   "--qat", "--epochs", str(args.qat_epochs), "--lr", f"{qat_lr:g}", "--output", str(qat_output)]
    if args.qat_epochs > 1:
        qat_command += ["--set", "qat.freeze_observers_epoch=1"]
    run(qat_command, env)
    qat = qat_output / "checkpoints" / "int8.pte"

    # float32 and both programs on the whole validation split, in this process
    model = build_model(weights).eval()
    data = quantize_data(None, weights.preprocessing, config, source=str(checkpoint))
    rows = []
    model_name = weights.model_name
    shown = {"ptq": "python -m mobilenetv3 " + command_line(ptq_command[3:]),
             "qat": ("torchrun ... " if args.nproc_per_node > 1 else "python -m mobilenetv3 ")
             + command_line(qat_command[len(launcher):])}
    for method, program in (("ptq", ptq), ("qat", qat)):
        comparison = compare_program(model, load_pte(program), evaluation_batches(data.val, labelled=True))
        if not rows:
            rows.append({"model": model_name, "weights": label, "method": "float32", "top1": comparison.float_top1,
                         "drop": None, "agreement": None, "pte_bytes": None,
                         "command": f"python -m mobilenetv3 eval --checkpoint {checkpoint.name}"})
        rows.append({"model": model_name, "weights": label, "method": method, "top1": comparison.int8_top1,
                     "drop": comparison.float_top1 - comparison.int8_top1, "agreement": comparison.agreement,
                     "pte_bytes": program.stat().st_size, "command": shown[method]})
    for row in rows:
        print(json.dumps(row))
    results.record(f"quantization-{label}", {
        "rows": rows, "val_images": comparison.images, "qat_epochs": args.qat_epochs, "qat_lr": qat_lr,
        "nproc_per_node": args.nproc_per_node, "calibration_images": args.calibration_images,
        "torch_threads": torch.get_num_threads()}, argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
