"""Export a model to ONNX, TorchScript or a torch.export ExportedProgram, then prove the file is right.

Every export is verified before it lands at its path: the artifact is written to a temporary file,
loaded back with its own runtime (ONNX Runtime, `torch.jit.load`, `torch.export.load`), run on random
inputs at two batch sizes (one when the batch is fixed) and compared with eager PyTorch.  A difference
above the tolerance raises `ExportVerificationError` and leaves no file behind.

The tolerance is 1e-4 in units of the output's scale: max |artifact - eager| <= 1e-4 * max(1, max |eager|).
For logits within +-1 that is exactly an absolute 1e-4.  Larger logits need the scale: float32 itself
is not exact to an absolute 1e-4 there (measured on MobileNetV3-Large with logits up to 39: eager
float32 differs from float64 by 3.5e-4, BN-folded eager from unfolded by 5.8e-4), while a wrong
operator (ONNX's default HardSigmoid alpha of 0.2, say) is off by orders of magnitude more.

BatchNorm is folded into the convolutions before exporting (`fuse.fuse_batchnorm`).  The artifact
carries the same metadata as a weights file (model name and kwargs, preprocessing, class names,
the source weights' sha256), so `predict` can run it without the original weights.

ONNX notes: the batch axis is dynamic unless a fixed batch is asked for.  h-swish is exported as ONNX
`HardSwish` (defined as x * max(0, min(1, x/6 + 1/2)), the paper's eq. 2) and the SE gate as
`HardSigmoid` with alpha=1/6, beta=0.5 written out explicitly: ONNX's default alpha for HardSigmoid is
0.2, which is *not* the paper's hard sigmoid and is what some converters silently produce.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..preprocessing import Preprocessing
from ..weights.io import atomic_write, model_description
from .engines import EXPORT_VERSION
from .fuse import count_batchnorms, fuse_batchnorm

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
DEFAULT_OPSET = 18
#: Key of the JSON metadata inside TorchScript / ExportedProgram archives (ONNX uses metadata_props).
METADATA_FILE = "mobilenetv3.json"


class ExportFormat(str, enum.Enum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    EXPORTED_PROGRAM = "exported-program"

    @property
    def suffix(self) -> str:
        return {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}[self.value]

    @classmethod
    def parse(cls, value: str) -> "ExportFormat":
        try:
            return cls(value)
        except ValueError:
            raise UserError(f"unknown export format {value!r}; choose from {', '.join(f.value for f in cls)}") from None


class ExportVerificationError(RuntimeError):
    """The exported artifact does not reproduce eager PyTorch within the tolerance."""


@dataclass
class ExportReport:
    path: Path
    format: ExportFormat
    input_size: int
    batch: int | None  # None: dynamic
    checked_batch_sizes: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    output_scale: float  # max |eager output| over the checked inputs
    batchnorms_folded: int
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "format": self.format.value, "input_size": self.input_size,
            "batch": "dynamic" if self.batch is None else self.batch,
            "checked_batch_sizes": list(self.checked_batch_sizes), "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance, "output_scale": self.output_scale,
            "allowed_diff": allowed_difference(self.tolerance, self.output_scale),
            "batchnorms_folded": self.batchnorms_folded,
        }


def artifact_metadata(
    model: nn.Module,
    preprocessing: Preprocessing,
    class_names: Sequence[str] | None = None,
    weights_sha256: str | None = None,
) -> dict[str, str]:
    """String metadata in the weights-file vocabulary (see `weights.io`), stored inside every artifact."""
    name, kwargs = model_description(model)
    metadata = {
        "format": "mobilenetv3-export",
        "export_version": EXPORT_VERSION,
        "model_name": name,
        "model_kwargs": json.dumps(kwargs, sort_keys=True),
        "num_classes": str(int(kwargs.get("num_classes", 1000))),
        "preprocessing": json.dumps(preprocessing.to_dict()),
    }
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    if weights_sha256:
        metadata["weights_sha256"] = weights_sha256
    return metadata


def _example_input(in_chans: int, input_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, input_size, input_size, generator=generator)


@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.WARNING):
    """The ONNX optimiser logs every rewrite at INFO; keep a CLI run's output to what matters."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, previous):
            lg.setLevel(old)


def _write_onnx(model: nn.Module, path: Path, example: torch.Tensor, dynamic: bool, opset: int,
                metadata: dict[str, str]) -> None:
    import onnx

    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None
    with _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
        program = torch.onnx.export(
            model, (example,), None, input_names=["input"], output_names=["logits"], opset_version=opset,
            dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False,
        )
        program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    check_hard_activations(proto)
    onnx.save(proto, str(path))


def check_hard_activations(proto) -> None:
    """Refuse an ONNX graph whose HardSigmoid is not the paper's relu6(x + 3) / 6 (alpha 1/6, beta 0.5)."""
    for node in proto.graph.node:
        if node.op_type == "HardSigmoid":
            attrs = {a.name: a.f for a in node.attribute}
            alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)  # ONNX's defaults
            if abs(alpha - 1 / 6) > 1e-6 or abs(beta - 0.5) > 1e-6:
                raise ExportVerificationError(
                    f"ONNX node {node.name!r} is HardSigmoid(alpha={alpha}, beta={beta}), not the paper's "
                    "hard sigmoid (alpha=1/6, beta=0.5)"
                )


@contextlib.contextmanager
def _torchscript_asked_for():
    """TorchScript warns that it is deprecated on every call; the user chose the format explicitly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        yield


def _write_torchscript(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    with _torchscript_asked_for():
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def _write_exported_program(model: nn.Module, path: Path, example: torch.Tensor, dynamic: bool,
                            metadata: dict[str, str]) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    # Through a file object: torch.export wants a ".pt2" name, and the temporary file has another.
    with open(path, "wb") as handle:
        torch.export.save(program, handle, extra_files={METADATA_FILE: json.dumps(metadata)})


def _load_exported_program(path: Path, extra_files: dict[str, str] | None = None):
    with open(path, "rb") as handle:
        return torch.export.load(handle, extra_files=extra_files)


def load_artifact(path: str | os.PathLike, fmt: ExportFormat, *, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function images (N, C, H, W float32) -> logits, run by the artifact's own runtime."""
    path = Path(path)
    if fmt is ExportFormat.ONNX:
        from .engines import onnxruntime_session

        session = onnxruntime_session(path, threads=threads)
        input_name = session.get_inputs()[0].name
        return lambda images: session.run(None, {input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]
    if fmt is ExportFormat.TORCHSCRIPT:
        with _torchscript_asked_for():
            module = torch.jit.load(str(path), map_location="cpu").eval()
    else:
        module = _load_exported_program(path).module()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()

    return run


def read_artifact_metadata(path: str | os.PathLike, fmt: ExportFormat) -> dict[str, str]:
    """The metadata `export_model` stored in an artifact ({} for a file exported by something else)."""
    path = Path(path)
    if fmt is ExportFormat.ONNX:
        from .engines import onnxruntime_session

        return dict(onnxruntime_session(path).get_modelmeta().custom_metadata_map)
    extra = {METADATA_FILE: ""}
    if fmt is ExportFormat.TORCHSCRIPT:
        with _torchscript_asked_for():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    else:
        _load_exported_program(path, extra)
    return json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}


def verification_batch_sizes(batch: int | None) -> tuple[int, ...]:
    """A fixed batch can only be checked at that size; a dynamic one at 1 and at 3 (neither is the
    export's example batch of 2, so a batch size baked into the graph would be caught)."""
    return (batch,) if batch is not None else (1, 3)


def allowed_difference(tolerance: float, output_scale: float) -> float:
    """The largest max-abs difference accepted: `tolerance` in units of max(1, output scale)."""
    return tolerance * max(1.0, output_scale)


def compare_outputs(
    reference: nn.Module, artifact: Callable[[np.ndarray], np.ndarray], in_chans: int, input_size: int,
    batch_sizes: Sequence[int], seed: int = 1,
) -> tuple[float, float]:
    """(max |artifact - eager|, max |eager|) over random inputs at each batch size."""
    worst, scale = 0.0, 0.0
    for offset, batch in enumerate(batch_sizes):
        images = _example_input(in_chans, input_size, batch, seed=seed + offset)
        with torch.inference_mode():
            expected = reference(images).numpy()
        actual = artifact(images.numpy())
        if actual.shape != expected.shape:
            raise ExportVerificationError(f"artifact output shape {actual.shape} != eager {expected.shape}")
        worst = max(worst, float(np.abs(actual - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return worst, scale


def export_model(
    model: nn.Module,
    output: str | os.PathLike,
    fmt: ExportFormat | str,
    *,
    input_size: int | None = None,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Fold BN, export `model` to `output`, and verify the artifact against the eager (unfused) model.

    Args:
        input_size: square input resolution (default: the model's `preprocessing.input_size`, else 224).
        batch: a fixed batch size, or None for a dynamic batch axis.
        metadata: strings stored in the artifact (default: `artifact_metadata(model, ...)`).
    """
    fmt = ExportFormat.parse(fmt) if isinstance(fmt, str) else fmt
    if batch is not None and batch < 1:
        raise UserError(f"--batch must be a positive integer or 'dynamic', got {batch}")
    preprocessing: Preprocessing = getattr(model, "preprocessing", None) or Preprocessing(
        in_chans=int(model.config.get("in_chans", 3))
    )
    input_size = int(input_size or preprocessing.input_size)
    if input_size < 8:
        raise UserError(f"--input-size must be at least 8, got {input_size}")
    if not 7 <= opset <= 23:
        raise UserError(f"--opset must be between 7 and 23, got {opset}")
    in_chans = int(model.config.get("in_chans", 3))
    if metadata is None:
        metadata = artifact_metadata(model, preprocessing.replace(input_size=input_size),
                                     getattr(model, "class_names", None))
    # A CPU eval-mode copy: the caller's model keeps its mode and device (the example inputs are CPU tensors).
    reference = copy.deepcopy(model).cpu().eval()
    fused = fuse_batchnorm(reference)
    folded = count_batchnorms(reference) - count_batchnorms(fused)  # those fuse_batchnorm could fold
    example = _example_input(in_chans, input_size, batch or 2)
    batch_sizes = verification_batch_sizes(batch)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, float] = {}

    def write_and_verify(tmp: str) -> None:
        tmp_path = Path(tmp)
        if fmt is ExportFormat.ONNX:
            _write_onnx(fused, tmp_path, example, batch is None, opset, metadata)
        elif fmt is ExportFormat.TORCHSCRIPT:
            _write_torchscript(fused, tmp_path, metadata)
        else:
            _write_exported_program(fused, tmp_path, example, batch is None, metadata)
        diff, scale = compare_outputs(reference, load_artifact(tmp_path, fmt), in_chans, input_size, batch_sizes)
        result.update(diff=diff, scale=scale)
        if not diff <= allowed_difference(tolerance, scale):  # also catches NaN
            raise ExportVerificationError(
                f"{fmt.value} export differs from eager PyTorch by {diff:.3g} (allowed {tolerance:g} x "
                f"max(1, max |output| = {scale:.3g})); nothing was written to {output}"
            )

    atomic_write(output, write_and_verify)
    report = ExportReport(output, fmt, input_size, batch, batch_sizes, result["diff"], tolerance, result["scale"],
                          folded, metadata)
    logger.debug("wrote %s (%s, batch %s, %d BatchNorms folded)", output, fmt.value,
                "dynamic" if batch is None else batch, folded)
    return report
