"""Quantization-aware training in the trainer (`mobilenetv3 train --qat`, `qat.enabled`).

The run trains the network's fake-quantized graph (`deploy.quantize.prepare_qat`: torch.export in train mode,
then PT2E `prepare_qat_pt2e` with XNNPACK's int8 scheme) instead of the network itself; everything else is the
float run's code: data order and per-sample augmentation, optimizer and schedule, DDP, checkpoints and
bit-exact resume.  What differs, and why:

- the checkpoints' "model" is the graph's state dict (the network's parameter names, plus the fake quantizers'
  `activation_post_process_N` ranges) and the checkpoint says so ("qat": the scheme and the traced image shape);
  `train --resume` rebuilds the same graph from the network and loads it, and `mobilenetv3 quantize` converts
  any of these checkpoints to an int8 program.  eval / predict / export refuse them with that advice;
- EMA, SWA, DropBlock, AMP, SyncBN and torch.compile are refused (`config.validate`): they act on the network's
  modules, which the graph replaces;
- BatchNorm statistics are per process under DDP (the graph's batch norm ops are not SyncBN modules), as in a
  float run without sync_bn;
- at the end, rank 0 converts the final graph and writes checkpoints/int8.pte, verified against the graph on
  the validation images it holds (its shard under DDP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

# (deploy.quantize and deploy.executorch import torchao and ExecuTorch only inside their functions)
from ..deploy.executorch import require_quantization
from ..deploy.export import artifact_metadata
from ..deploy.quantize import QAT_SCHEME, freeze_observers, qat_state_dict, qat_to_pte
from ..deploy.quantize import prepare_qat as prepare
from ..errors import UserError
from ..files import file_sha256

__all__ = ["prepare", "freeze_observers", "require_extra", "checkpoint_entry", "state_dict", "refuse_mixed_resume",
           "write_program"]

PROGRAM_NAME = "int8.pte"


def require_extra() -> None:
    require_quantization("quantization-aware training (--qat)")


def checkpoint_entry(image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """What a QAT checkpoint carries beside the graph's state (`deploy.quantize.qat_model_from_checkpoint`)."""
    return {"scheme": QAT_SCHEME, "image_shape": [int(size) for size in image_shape]}


def state_dict(graph: nn.Module) -> dict[str, torch.Tensor]:
    """The graph's state for a checkpoint, on the CPU (observers paused by validation count as training left them)."""
    return {key: value.detach().cpu().clone() for key, value in qat_state_dict(graph).items()}


def refuse_mixed_resume(payload: dict[str, Any], qat_enabled: bool, path: Path) -> None:
    """A float checkpoint cannot continue as QAT, nor a QAT one as float: their "model" states differ in kind."""
    if bool(payload.get("qat")) == qat_enabled:
        return
    if qat_enabled:
        raise UserError(f"{path} is a float run's checkpoint: start quantization-aware training from it as a new run "
                        f"(--pretrained {path} --qat --output NEW_FOLDER), not with --resume")
    raise UserError(f"{path} is a quantization-aware training checkpoint: resume it with qat.enabled (its own "
                    "config: drop --no-qat / qat.enabled=false)")


def write_program(graph: nn.Module, network: nn.Module, folder: Path, *, preprocessing, class_names: list[str],
                  source: Path, val_batches: Iterator, batch: int):
    """Convert the trained graph to checkpoints/int8.pte (metadata: the network's, the preprocessing, the
    classes and the sha256 of `source`, the checkpoint it came from); returns the `QuantizeReport`."""
    metadata = artifact_metadata(network, preprocessing, class_names, file_sha256(source))
    return qat_to_pte(graph, folder / PROGRAM_NAME, metadata, val_batches, batch=batch)
