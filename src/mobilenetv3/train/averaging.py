"""Checkpoint averaging (torchvision's `utils.average_checkpoints`, as used for its MobileNetV3 weights).

Float tensors are averaged in float64 and cast back; integer buffers (BatchNorm's num_batches_tracked)
are taken from the last checkpoint.  All inputs must describe the same network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..factory import create_model
from ..weights.io import load_checkpoint, read_weights, save_model
from .checkpoint import best_first, epoch_checkpoints
from .checkpoint import save as save_checkpoint
from .config import BEST_METRICS

logger = logging.getLogger(__name__)


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not state_dicts:
        raise UserError("nothing to average: no checkpoints given")
    keys = list(state_dicts[0])
    for index, state in enumerate(state_dicts[1:], start=1):
        if list(state) != keys:
            raise UserError(f"checkpoint {index + 1} has different keys from the first")
    averaged = {}
    for key in keys:
        tensors = [state[key] for state in state_dicts]
        if tensors[0].is_floating_point():
            total = torch.zeros_like(tensors[0], dtype=torch.float64)
            for tensor in tensors:
                total += tensor.to(torch.float64)
            averaged[key] = (total / len(tensors)).to(tensors[0].dtype)
        else:
            averaged[key] = tensors[-1].clone()
    return averaged


def select_from_run(run_dir: str | Path, *, last: int | None = None, best: int | None = None,
                    metric: str = "val_top1") -> list[Path]:
    """The last / best k of a run's checkpoints/epoch_NNNN.pt (kept with checkpoint.keep_last_epochs)."""
    files = epoch_checkpoints(Path(run_dir, "checkpoints"))
    if not files:
        raise UserError(f"{run_dir} has no checkpoints/epoch_*.pt (train with --set checkpoint.keep_last_epochs=K)")
    if last is not None:
        return files[-last:]
    if metric not in BEST_METRICS:
        raise UserError(f"--metric must be one of {', '.join(BEST_METRICS)}")
    scored = []
    for path in files:
        metrics = load_checkpoint(path).get("metrics") or {}
        if metric not in metrics:
            raise UserError(f"{path} has no logged {metric}")
        scored.append((metrics[metric], path))
    chosen = set(best_first(scored, BEST_METRICS[metric])[:best])
    return [path for path in files if path in chosen]  # in epoch order


def average_files(paths: list[str | Path], output: str | Path, *, ema: bool = False) -> dict[str, Any]:
    """Average the model (or EMA) weights of `paths` into `output` (.safetensors, or a .pt checkpoint)."""
    loaded = [read_weights(path, ema=ema) for path in paths]
    for weights in loaded:
        if weights.extra.get("qat"):  # fake quantizers' scales and zero points do not average
            raise UserError(f"{weights.path} is a quantization-aware training checkpoint: its states cannot be "
                            "averaged (convert one with `mobilenetv3 quantize`)")
    first = loaded[0]
    for weights in loaded[1:]:
        if weights.model_name != first.model_name or weights.model_kwargs != first.model_kwargs:
            raise UserError(f"{weights.path} is a different network ({weights.model_name}) from {first.path} "
                            f"({first.model_name}); only checkpoints of one network can be averaged")
    state = average_state_dicts([weights.state_dict for weights in loaded])
    output = Path(output)
    if output.suffix == ".safetensors":
        model = create_model(first.model_name, **first.model_kwargs)
        model.load_state_dict(state)
        save_model(model, output, preprocessing=first.preprocessing, class_names=first.class_names,
                   extra={"averaged_from": [str(p) for p in paths], "ema": ema})
    else:
        save_checkpoint(output, {
            "format": "mobilenetv3-average", "model_name": first.model_name, "model_kwargs": first.model_kwargs,
            "model": state, "preprocessing": first.preprocessing.to_dict(), "class_names": first.class_names,
            "averaged_from": [str(p) for p in paths], "ema": None,
        })
    return {"output": str(output), "inputs": [str(p) for p in paths], "model": first.model_name, "ema": ema}
