"""Export a model to ONNX, TorchScript, a torch.export ExportedProgram or an ExecuTorch program, then prove
the file is right.

Every export is verified before it lands at its path: the artifact is written to a temporary file,
loaded back with its own runtime (ONNX Runtime, `torch.jit.load`, `torch.export.load`, ExecuTorch's
`Runtime`) and run at two batch sizes (one when the batch is fixed).  A failed check raises `ExportVerificationError` and leaves
no file behind.

The reference is the unfused model evaluated in float64, not float32 eager PyTorch: float32 is itself
inexact, the more so the larger the logits, and the check must not blame the artifact for float32's
rounding.  Float32 eager is run on the same inputs and its own error against float64 is measured; the
artifact is accepted when

    max |artifact - float64| <= max(EAGER_ERROR_MULTIPLE x max |eager float32 - float64|,
                                    tolerance x max(1, max |float64 output|))

The first term is float32's own error on these inputs: a BN-folded graph run by another runtime rounds
differently but no worse (measured, see EAGER_ERROR_MULTIPLE).  The second is a floor for outputs where
float32 happens to be nearly exact: `tolerance` (default 1e-4) in units of the output's scale, so an
absolute 1e-4 for logits within +-1.  A wrong operator (ONNX's default HardSigmoid alpha of 0.2) or a
wrong weight is off by orders of magnitude more (both tested).

The inputs are in the data's range: real images when the caller has them (`predict` passes a few of the
user's), else smooth random colour fields (uniform pixels in [0, 1] on a coarse grid, interpolated)
through the stored normalisation.  Standard-normal inputs are not: on a model whose BatchNorm statistics
come from photos they drive the logits far outside the data's range, where float32 eager itself is far
off (issue 22; `benchmarks/export_verification.py` measures each kind of input against each rule).

BatchNorm is folded into the convolutions before exporting (`fuse.fuse_batchnorm`).  The artifact
carries the same metadata as a weights file (model name and kwargs, preprocessing, class names,
the source weights' sha256), so `predict` can run it without the original weights.

ONNX notes: the batch axis is dynamic unless a fixed batch is asked for.  h-swish is exported as ONNX
`HardSwish` (defined as x * max(0, min(1, x/6 + 1/2)), the paper's eq. 2) and the SE gate as
`HardSigmoid` with alpha=1/6, beta=0.5 written out explicitly: ONNX's default alpha for HardSigmoid is
0.2, which is *not* the paper's hard sigmoid and is what some converters silently produce.

Segmentation models (LR-ASPP, `{"out": logits}` in eager PyTorch) are exported through `SegmentationLogits`:
the artifact's one output is the plain logits tensor (N, classes, H, W), named "logits" as a classifier's, and
the metadata says "task": "segmentation".  ONNX and ExportedProgram exports have a dynamic batch AND a dynamic
height and width (the gate pools globally, so no traced size is baked in), and are verified at the square
input size and at two more sizes of other shapes (`segmentation_check_sizes`).  TorchScript is scripted,
hence size-free; it is checked at the same sizes.  ExecuTorch programs are fixed in batch and size.

Detection models (SSDLite, a torchvision `SSD`: a list of {boxes, labels, scores} in eager PyTorch) are
exported through `detection.SSDLiteRaw`: the network up to its raw head outputs, plus the anchors as a constant.
The artifact's input "input" is [N, C, H, W] pixels in [0, 1] at the model's own size (it normalises itself);
its outputs are "bbox_regression" [N, A, 4], "cls_logits" [N, A, K] and "anchors" [A, 4], and
`detection.decode` turns them into detections (see `deploy.detection`).  The spatial size is fixed (the anchors
depend on it: another --input-size is refused); the batch is dynamic except in ExecuTorch programs.  Each output
is verified on its own against float64 by the rule above; BatchNorm is folded in torchvision's
Conv2dNormActivation blocks too (the extra blocks and the head); TorchScript is traced, not scripted (the
backbone's dict output is not scriptable), and checked at two batch sizes.  The metadata says "task":
"detection" and carries "detection" (JSON: input size, thresholds, box-coder weights, output names).

ExecuTorch notes (`.pte`, the optional `[mobile]` extra, see `deploy.executorch`): a float32 program
with every supported operator delegated to XNNPACK, at a fixed batch size (1 unless one is asked for:
ExecuTorch plans its buffers for one size, and its dynamic-batch bounds were not reliable here).  The
metadata is embedded in the program as a constant method, with "quantization": "none".
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..files import missing_folders, remove_empty_folders
from ..preprocessing import Preprocessing
from ..models.heads.lraspp import LRASPP
from ..weights.io import atomic_write, model_metadata
from . import executorch  # our .pte module: the ExecuTorch package itself is imported only by its functions
from .fuse import count_batchnorms, fuse_batchnorm
from .runtime import EXPORT_VERSION, onnxruntime_session

logger = logging.getLogger(__name__)

#: The floor of the allowed difference, in units of max(1, max |output|).
DEFAULT_TOLERANCE = 1e-4
#: Accept an artifact up to this multiple of float32 eager's own error against float64.  Criterion: above
#: the ratio max |artifact - float64| / max |eager float32 - float64| of every correct export (ONNX Runtime,
#: TorchScript, ExportedProgram; on random fields, real images, randn and uniform pixels), while one 1x1 conv
#: weight scaled by 1.01 lands far outside the allowance (`benchmarks/export_verification.py`; tests/test_export.py).
EAGER_ERROR_MULTIPLE = 4.0
DEFAULT_OPSET = 18
#: Key of the JSON metadata inside TorchScript / ExportedProgram archives (ONNX uses metadata_props).
METADATA_FILE = "mobilenetv3.json"
#: Output name endings that name a format, for `export --output` without `--format` (longest first).
FORMAT_SUFFIXES = ((".torchscript.pt", "torchscript"), (".onnx", "onnx"), (".pt2", "exported-program"),
                   (".ts", "torchscript"), (".pte", "executorch"))
#: The batch size of an ExecuTorch export when none is asked for (its programs have a fixed batch size).
EXECUTORCH_DEFAULT_BATCH = 1
#: `dynamic_shapes` of every graph exported with a dynamic batch axis (ONNX, ExportedProgram, and the PT2E
#: programs `quantize` prepares): the one input's dimension 0.
DYNAMIC_BATCH = ({0: torch.export.Dim("batch", min=1, max=65536)},)
#: `dynamic_shapes` of a segmentation export: batch, height and width (from 32 px: the smallest size the
#: stride-32 stem-to-tail path of a classifier-sized backbone is meant for; smaller ones also run in eager).
SPATIAL_DIMS = {2: torch.export.Dim("height", min=32, max=8192), 3: torch.export.Dim("width", min=32, max=8192)}


class ExportFormat(str, enum.Enum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    EXPORTED_PROGRAM = "exported-program"
    EXECUTORCH = "executorch"

    @property
    def suffix(self) -> str:
        return {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2",
                "executorch": ".pte"}[self.value]

    @property
    def dynamic_batch(self) -> bool:
        """Whether this format can have a dynamic batch axis (ExecuTorch programs have a fixed batch size)."""
        return self is not ExportFormat.EXECUTORCH

    @classmethod
    def parse(cls, value: str) -> "ExportFormat":
        try:
            return cls(value)
        except ValueError:
            raise UserError(f"unknown export format {value!r}; choose from {', '.join(f.value for f in cls)}") from None

    @classmethod
    def from_suffix(cls, path: str | os.PathLike) -> "ExportFormat | None":
        """The format an output name implies (model.onnx -> onnx), or None for a name that implies none."""
        name = Path(path).name.lower()
        return next((cls(fmt) for suffix, fmt in FORMAT_SUFFIXES if name.endswith(suffix)), None)

    @classmethod
    def for_output(cls, output: str | os.PathLike, fmt: "ExportFormat | str | None" = None) -> "ExportFormat":
        """`fmt`, or the one `output`'s name implies; a name implying another format than `fmt` is refused,
        so a TorchScript archive never lands in a file called model.onnx."""
        implied = cls.from_suffix(output)
        known = ", ".join(f"{suffix} ({name})" for suffix, name in FORMAT_SUFFIXES)
        if fmt is None:
            if implied is None:
                raise UserError(f"cannot tell the export format from {output}: pass --format or name the output "
                                f"with one of {known}")
            return implied
        fmt = cls.parse(fmt) if isinstance(fmt, str) else fmt
        if implied is not None and implied is not fmt:
            raise UserError(f"--format {fmt.value} does not match --output {output}, whose name says {implied.value}; "
                            f"use --format {implied.value} or an output ending in {fmt.suffix}")
        return fmt


def model_task(model: nn.Module) -> str:
    """"segmentation" for an LR-ASPP model (a `{"out": logits}` output), "detection" for an SSDLite model (a
    torchvision `SSD`), else "classification"."""
    if isinstance(model, LRASPP):
        return "segmentation"
    # an SSDLite instance means its module is imported: no need to import torchvision's detection package here
    ssdlite = sys.modules.get("mobilenetv3.models.heads.ssdlite")
    if ssdlite is not None and isinstance(model, ssdlite.SSDLite):
        return "detection"
    return "classification"


class SegmentationLogits(nn.Module):
    """A segmentation model's `{"out": logits}` as the plain tensor an export returns (N, classes, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def segmentation_check_sizes(input_size: int) -> tuple[tuple[int, int], ...]:
    """The (height, width) pairs a segmentation export is checked at besides the square input size: a wide and
    a tall one, neither square nor the traced size, so a baked-in height or width is caught."""
    small, large = max(32, input_size // 2 + 8), input_size + input_size // 2
    return ((small, large), (large, small))


class ExportVerificationError(RuntimeError):
    """The exported artifact does not reproduce the model (see the module docstring for the rule)."""


@dataclass
class ExportReport:
    path: Path
    format: ExportFormat
    input_size: int
    batch: int | None  # None: dynamic
    checked_batch_sizes: tuple[int, ...]
    max_abs_diff: float  # max |artifact - float64 eager| over the checked inputs
    tolerance: float
    output_scale: float  # max |float64 eager output| over the checked inputs
    batchnorms_folded: int
    metadata: dict[str, str] = field(default_factory=dict)
    eager_float32_diff: float = 0.0  # max |float32 eager - float64 eager|: float32's own error
    real_images: int = 0  # how many of the checked inputs were real images (the rest: random_fields)
    task: str = "classification"
    #: (height, width) of every checked input size (segmentation: the square size and `segmentation_check_sizes`)
    checked_sizes: tuple[tuple[int, int], ...] = ()
    #: a multi-output artifact (detection): output name -> its own comparison (the fields above are the worst one's)
    outputs: dict[str, "Comparison"] = field(default_factory=dict)

    @property
    def allowed_diff(self) -> float:
        return allowed_difference(self.tolerance, self.output_scale, self.eager_float32_diff)

    def to_dict(self) -> dict[str, Any]:
        # segmentation: one more batch of random fields (of the smallest checked batch size) per further size
        checked = sum(self.checked_batch_sizes) + max(0, len(self.checked_sizes) - 1) * min(self.checked_batch_sizes)
        return {
            "path": str(self.path), "format": self.format.value, "input_size": self.input_size,
            "batch": "dynamic" if self.batch is None else self.batch,
            "checked_batch_sizes": list(self.checked_batch_sizes), "reference": "float64",
            "inputs": {"images": self.real_images, "random_fields": checked - self.real_images},
            "max_abs_diff": self.max_abs_diff, "eager_float32_diff": self.eager_float32_diff,
            "tolerance": self.tolerance, "eager_multiple": EAGER_ERROR_MULTIPLE, "output_scale": self.output_scale,
            "allowed_diff": self.allowed_diff, "batchnorms_folded": self.batchnorms_folded,
            "task": self.task, "checked_sizes": [list(size) for size in self.checked_sizes],
            **({"outputs": {name: part.to_dict(self.tolerance) for name, part in self.outputs.items()}}
               if self.outputs else {}),
        }


def artifact_metadata(
    model: nn.Module,
    preprocessing: Preprocessing,
    class_names: Sequence[str] | None = None,
    weights_sha256: str | None = None,
) -> dict[str, str]:
    """String metadata in the weights-file vocabulary (`weights.io.model_metadata`), stored inside every artifact.

    A detector's "preprocessing" is always its artifact's input (`detection.artifact_preprocessing`: pixels in
    [0, 1] at the model's size, which the model normalises itself), whatever `preprocessing` says, and
    `detection.detection_metadata` is added."""
    task = model_task(model)
    if task == "detection":
        from . import detection  # torchvision's detection package: on use

        preprocessing = detection.artifact_preprocessing(model)
    metadata = {"format": "mobilenetv3-export", "export_version": EXPORT_VERSION,
                **model_metadata(model, preprocessing, class_names)}
    if task == "segmentation":
        metadata["task"] = "segmentation"  # predict writes masks (runtime.task_for)
    elif task == "detection":
        metadata.update(detection.detection_metadata(model))  # "task": "detection", and what decode needs
    if weights_sha256:
        metadata["weights_sha256"] = weights_sha256
    return metadata


def _example_input(in_chans: int, input_size: int, batch: int, seed: int = 0,
                   width: int | None = None) -> torch.Tensor:
    """The tracing example (only its shape and dtype matter)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, input_size, width or input_size, generator=generator)


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


def _dynamic_shapes(dynamic: bool, spatial: bool):
    """None (all fixed), the batch axis, and (segmentation) the height and width."""
    dims = {**(DYNAMIC_BATCH[0] if dynamic else {}), **(SPATIAL_DIMS if spatial else {})}
    return (dims,) if dims else None


def _write_onnx(model: nn.Module, path: Path, example: torch.Tensor, dynamic: bool, opset: int,
                metadata: dict[str, str], spatial: bool = False, output_names: Sequence[str] = ("logits",)) -> None:
    import onnx  # the optional [onnx] extra: only for an ONNX export

    dynamic_shapes = _dynamic_shapes(dynamic, spatial)
    # a constant output (a detector's anchors) is an initializer the deduplication pass warns it leaves alone
    with _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"), \
            _quiet_loggers("onnx_ir.passes.common.initializer_deduplication", level=logging.ERROR):
        program = torch.onnx.export(
            model, (example,), None, input_names=["input"], output_names=list(output_names), opset_version=opset,
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


def _write_torchscript(model: nn.Module, path: Path, metadata: dict[str, str],
                       example: torch.Tensor | None = None) -> None:
    """Scripted; traced on `example` when one is given (a detector: its backbone's dict output is not scriptable,
    and its input size is fixed anyway)."""
    with _torchscript_asked_for():
        if example is None:
            module = torch.jit.script(model)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                module = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(module, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def _write_exported_program(model: nn.Module, path: Path, example: torch.Tensor, dynamic: bool,
                            metadata: dict[str, str], spatial: bool = False) -> None:
    dynamic_shapes = _dynamic_shapes(dynamic, spatial)
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    # Through a file object: torch.export wants a ".pt2" name, and the temporary file has another.
    with open(path, "wb") as handle:
        torch.export.save(program, handle, extra_files={METADATA_FILE: json.dumps(metadata)})


def _write_executorch(model: nn.Module, path: Path, example: torch.Tensor, metadata: dict[str, str]) -> None:
    program = torch.export.export(model, (example,), strict=False)  # the example's batch size is the program's
    executorch.write_pte(program, path, metadata)


def _load_exported_program(path: Path, extra_files: dict[str, str] | None = None):
    with open(path, "rb") as handle:
        return torch.export.load(handle, extra_files=extra_files)


def load_artifact(path: str | os.PathLike, fmt: ExportFormat, *, threads: int | None = None,
                  all_outputs: bool = False) -> Callable[[np.ndarray], Any]:
    """A function images (N, C, H, W float32) -> logits, run by the artifact's own runtime; with `all_outputs`,
    -> the list of every output (a detector's bbox_regression, cls_logits and anchors), the batch as given."""
    path = Path(path)
    if fmt is ExportFormat.ONNX:
        session = onnxruntime_session(path, threads=threads)
        input_name = session.get_inputs()[0].name

        def run_onnx(images: np.ndarray):
            outputs = session.run(None, {input_name: np.ascontiguousarray(images, dtype=np.float32)})
            return outputs if all_outputs else outputs[0]

        return run_onnx
    if fmt is ExportFormat.EXECUTORCH:
        program = executorch.load_pte(path, threads=threads)
        return program.run_all if all_outputs else program
    if fmt is ExportFormat.TORCHSCRIPT:
        with _torchscript_asked_for():
            module = torch.jit.load(str(path), map_location="cpu").eval()
    else:
        module = _load_exported_program(path).module()

    def run(images: np.ndarray):
        with torch.inference_mode():
            output = module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        if isinstance(output, (tuple, list)):
            outputs = [tensor.numpy() for tensor in output]
            return outputs if all_outputs else outputs[0]
        return [output.numpy()] if all_outputs else output.numpy()

    return run


def read_artifact_metadata(path: str | os.PathLike, fmt: ExportFormat) -> dict[str, str]:
    """The metadata `export_model` stored in an artifact ({} for a file exported by something else)."""
    path = Path(path)
    if fmt is ExportFormat.ONNX:
        return dict(onnxruntime_session(path).get_modelmeta().custom_metadata_map)
    if fmt is ExportFormat.EXECUTORCH:
        return executorch.read_pte_metadata(path)
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


def allowed_difference(tolerance: float, output_scale: float, eager_diff: float = 0.0) -> float:
    """The largest max |artifact - float64| accepted: EAGER_ERROR_MULTIPLE x float32 eager's own error,
    but at least `tolerance` in units of max(1, output scale)."""
    # The floor first: max() keeps its first argument when the second is NaN.
    return max(tolerance * max(1.0, output_scale), EAGER_ERROR_MULTIPLE * eager_diff)


def random_fields(count: int, channels: int, input_size: int | tuple[int, int],
                  generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields in [0, 1]: uniform pixels on a coarse grid (2 to 8 cells a side),
    interpolated bilinearly (convex weights: the values stay in [0, 1]) to the input size."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    fields = []
    for _ in range(count):
        rows, cols = (int(v) for v in torch.randint(2, 9, (2,), generator=generator))
        coarse = torch.rand(1, channels, rows, cols, generator=generator)
        fields.append(nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False))
    return torch.cat(fields) if fields else torch.empty(0, channels, *size)


def verification_inputs(
    preprocessing: Preprocessing, input_size: int | tuple[int, int], batch_sizes: Sequence[int], images: Any = None,
    seed: int = 1,
) -> list[torch.Tensor]:
    """One float32 batch per size, in the data's range: `images` first (real, already normalised,
    N x C x R x R, or N x C x H x W for an (H, W) `input_size`), then `random_fields` through the stored mean/std.

    Smooth fields rather than independent uniform pixels: on the issue-22 model (BN statistics from smooth
    images) independent pixels drive the logits and float32 eager's own error up as randn does, while smooth
    fields keep both in the range of the images themselves (`benchmarks/export_verification.py`).
    """
    channels, total = preprocessing.in_chans, sum(batch_sizes)
    shape = (channels, *((input_size, input_size) if isinstance(input_size, int) else input_size))
    real = torch.empty(0, *shape)
    if images is not None and len(images):
        real = torch.as_tensor(np.asarray(images, dtype=np.float32))[:total]
        if tuple(real.shape[1:]) != shape:
            raise ValueError(f"verification images are {tuple(real.shape[1:])}, the export takes {shape}")
    generator = torch.Generator().manual_seed(seed)
    pixels = random_fields(total - len(real), channels, shape[1:], generator)
    return list(torch.cat([real, _normalised(pixels, preprocessing)]).split(list(batch_sizes)))


def _normalised(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Pixels in [0, 1] (N, C, H, W) through the stored mean/std, as the eval transform normalises."""
    channels = preprocessing.in_chans
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, channels, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, channels, 1, 1)
    return (pixels - mean) / std


def spatial_verification_inputs(preprocessing: Preprocessing, sizes: Sequence[tuple[int, int]], batch: int,
                                seed: int = 2) -> list[torch.Tensor]:
    """One batch of `random_fields` per (height, width) in `sizes`, through the stored mean/std."""
    generator = torch.Generator().manual_seed(seed)
    return [_normalised(random_fields(batch, preprocessing.in_chans, size, generator), preprocessing)
            for size in sizes]


@dataclass(frozen=True)
class Comparison:
    """The artifact and float32 eager PyTorch, each against the model evaluated in float64.

    A multi-output artifact (detection) has one comparison per output in `parts` (named in `names`): it passes
    when every output does, and the three numbers are those of the output closest to (or furthest past) its
    allowance."""

    artifact_diff: float  # max |artifact - float64|
    eager_diff: float  # max |eager float32 - float64|: float32's own rounding on these inputs
    scale: float  # max |float64 output|
    parts: tuple["Comparison", ...] = ()
    names: tuple[str, ...] = ()

    def allowed(self, tolerance: float) -> float:
        return allowed_difference(tolerance, self.scale, self.eager_diff)

    def passes(self, tolerance: float) -> bool:
        if self.parts:
            return all(part.passes(tolerance) for part in self.parts)
        return self.artifact_diff <= self.allowed(tolerance)  # False for NaN

    def describe(self, tolerance: float) -> str:
        if self.parts:
            failing = [(name, part) for name, part in zip(self.names, self.parts) if not part.passes(tolerance)]
            shown = failing or list(zip(self.names, self.parts))
            return "; ".join(f"output {name}: {part.describe(tolerance)}" for name, part in shown)
        return (f"max |artifact - float64| {self.artifact_diff:.3g}, float32 eager's own {self.eager_diff:.3g} "
                f"(max |output| {self.scale:.3g}; allowed max({EAGER_ERROR_MULTIPLE:g} x {self.eager_diff:.3g}, "
                f"{tolerance:g} x max(1, {self.scale:.3g})) = {self.allowed(tolerance):.3g})")

    def to_dict(self, tolerance: float) -> dict[str, float]:
        return {"max_abs_diff": self.artifact_diff, "eager_float32_diff": self.eager_diff,
                "output_scale": self.scale, "allowed_diff": self.allowed(tolerance)}


def _output_list(output: Any) -> list[np.ndarray]:
    if isinstance(output, torch.Tensor):
        return [output.detach().numpy()]
    if isinstance(output, np.ndarray):
        return [output]
    return [np.asarray(o.detach().numpy() if isinstance(o, torch.Tensor) else o) for o in output]


def compare_outputs(
    reference: nn.Module, artifact: Callable[[np.ndarray], Any], batches: Sequence[torch.Tensor],
    names: Sequence[str] | None = None,
) -> Comparison:
    """Run `artifact`, float32 `reference` and a float64 copy of `reference` (eval mode, CPU) on each batch.

    A reference returning a tuple (a detector's `SSDLiteRaw`) is compared output by output, with `artifact`
    returning the list of its outputs (`load_artifact(..., all_outputs=True)`) and `names` naming them."""
    reference = copy.deepcopy(reference).cpu().eval()
    exact = copy.deepcopy(reference).double()
    worst: list[float] = []
    eager_worst: list[float] = []
    scale: list[float] = []
    multi = False
    for images in batches:
        with torch.inference_mode():
            raw = exact(images.double())
            expected = _output_list(raw)
            eager = [e.astype(np.float64) for e in _output_list(reference(images))]
        multi = isinstance(raw, (tuple, list))
        actual = _output_list(artifact(images.numpy()))
        if len(actual) != len(expected):
            raise ExportVerificationError(f"the artifact has {len(actual)} outputs, eager {len(expected)}")
        if not worst:
            worst, eager_worst, scale = [0.0] * len(expected), [0.0] * len(expected), [0.0] * len(expected)
        for i, (got, want, own) in enumerate(zip(actual, expected, eager)):
            if got.shape != want.shape:
                raise ExportVerificationError(f"artifact output shape {got.shape} != eager {want.shape}")
            # max(worst, nan) is worst: a NaN anywhere must fail the check, so it is kept explicitly.
            diff = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
            worst[i] = diff if np.isnan(diff) else max(worst[i], diff)
            if want.size:
                eager_worst[i] = max(eager_worst[i], float(np.abs(own - want).max()))
                scale[i] = max(scale[i], float(np.abs(want).max()))
    parts = tuple(Comparison(w, e, s) for w, e, s in zip(worst, eager_worst, scale))
    if not multi:
        return parts[0] if parts else Comparison(0.0, 0.0, 0.0)
    names = tuple(names or (f"output{i}" for i in range(len(parts))))

    def closeness(part: Comparison) -> float:  # how much of its allowance an output uses (NaN: all of it)
        ratio = part.artifact_diff / part.allowed(DEFAULT_TOLERANCE)
        return float("inf") if np.isnan(ratio) else ratio

    top = max(parts, key=closeness)
    return Comparison(top.artifact_diff, top.eager_diff, top.scale, parts, names)


def verify_artifact(
    reference: nn.Module, artifact: Callable[[np.ndarray], Any], batches: Sequence[torch.Tensor], *,
    tolerance: float = DEFAULT_TOLERANCE, name: str = "the artifact", names: Sequence[str] | None = None,
) -> Comparison:
    """`compare_outputs`, raising `ExportVerificationError` when the artifact is outside the allowed difference."""
    comparison = compare_outputs(reference, artifact, batches, names)
    if not comparison.passes(tolerance):
        raise ExportVerificationError(f"{name} does not reproduce the model: {comparison.describe(tolerance)}")
    return comparison


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
    images: Any = None,
) -> ExportReport:
    """Fold BN, export `model` to `output`, and verify the artifact against the unfused model in float64.

    Args:
        input_size: square input resolution (default: the model's `preprocessing.input_size`, else 224; a detector:
            its own fixed size, and no other).
        batch: a fixed batch size, or None for a dynamic batch axis (ExecuTorch: `EXECUTORCH_DEFAULT_BATCH`).
        metadata: strings stored in the artifact (default: `artifact_metadata(model, ...)`).
        tolerance: the floor of the allowed difference, in units of max(1, max |output|) (module docstring).
        images: real inputs to verify on (normalised, N x C x R x R; a detector: pixels in [0, 1] at its size,
            `detection.load_samples`); `random_fields` fill the rest.
    """
    fmt = ExportFormat.parse(fmt) if isinstance(fmt, str) else fmt
    if batch is not None and batch < 1:
        raise UserError(f"--batch must be a positive integer or 'dynamic', got {batch}")
    if fmt is ExportFormat.EXECUTORCH:
        executorch.require_executorch("--format executorch")  # before any work
        batch = batch or EXECUTORCH_DEFAULT_BATCH
    task = model_task(model)
    if task == "detection":
        return _export_detector(model, output, fmt, input_size=input_size, batch=batch, opset=opset,
                                metadata=metadata, tolerance=tolerance, images=images)
    in_chans = int(model.config.get("in_chans", 3))
    preprocessing: Preprocessing = model.preprocessing or Preprocessing.default(in_chans)
    input_size = int(input_size or preprocessing.input_size)
    if input_size < 8:
        raise UserError(f"--input-size must be at least 8, got {input_size}")
    if not 7 <= opset <= 23:
        raise UserError(f"--opset must be between 7 and 23, got {opset}")
    if metadata is None:
        metadata = artifact_metadata(model, preprocessing.replace(input_size=input_size), model.class_names)
    if fmt is ExportFormat.EXECUTORCH:
        metadata = {"quantization": "none", **metadata}  # what write_pte stores: a float32 program
    # A CPU eval-mode copy: the caller's model keeps its mode and device (the example inputs are CPU tensors).
    reference = copy.deepcopy(model).cpu().eval()
    fused = fuse_batchnorm(reference)
    folded = count_batchnorms(reference) - count_batchnorms(fused)  # those fuse_batchnorm could fold
    # A segmentation model's size is dynamic where the format allows it (not ExecuTorch): a non-square example,
    # so that neither the traced height nor width equals the other or a checked size.
    spatial = task == "segmentation" and fmt is not ExportFormat.EXECUTORCH
    example = _example_input(in_chans, input_size, batch or 2, width=input_size + 8 if spatial else None)
    batch_sizes = verification_batch_sizes(batch)
    batches = verification_inputs(preprocessing, input_size, batch_sizes, images)
    checked_sizes: tuple[tuple[int, int], ...] = ((input_size, input_size),)
    if spatial:
        extra = segmentation_check_sizes(input_size)
        batches += spatial_verification_inputs(preprocessing, extra, batch or 1)
        checked_sizes += extra
    if task == "segmentation":  # the artifact returns the logits tensor, not {"out": logits}
        reference, fused = SegmentationLogits(reference).eval(), SegmentationLogits(fused).eval()
    real_images = min(len(images) if images is not None else 0, sum(batch_sizes))
    output = Path(output)
    created = missing_folders(output.parent)  # removed again if the export fails: a failed command leaves nothing
    output.parent.mkdir(parents=True, exist_ok=True)
    result: list[Comparison] = []

    def write_and_verify(tmp: str) -> None:
        tmp_path = Path(tmp)
        if fmt is ExportFormat.ONNX:
            _write_onnx(fused, tmp_path, example, batch is None, opset, metadata, spatial)
        elif fmt is ExportFormat.TORCHSCRIPT:
            _write_torchscript(fused, tmp_path, metadata)
        elif fmt is ExportFormat.EXECUTORCH:
            _write_executorch(fused, tmp_path, example, metadata)
        else:
            _write_exported_program(fused, tmp_path, example, batch is None, metadata, spatial)
        try:
            result.append(verify_artifact(reference, load_artifact(tmp_path, fmt), batches, tolerance=tolerance,
                                          name=f"the {fmt.value} export"))
        except ExportVerificationError as error:
            raise ExportVerificationError(f"{error}; nothing was written to {output}") from None

    try:
        atomic_write(output, write_and_verify)
    except BaseException:
        remove_empty_folders(created)
        raise
    comparison = result[0]
    report = ExportReport(output, fmt, input_size, batch, batch_sizes, comparison.artifact_diff, tolerance,
                          comparison.scale, folded, metadata, eager_float32_diff=comparison.eager_diff,
                          real_images=real_images, task=task, checked_sizes=checked_sizes)
    logger.debug("wrote %s (%s, batch %s, %d BatchNorms folded)", output, fmt.value,
                 "dynamic" if batch is None else batch, folded)
    return report


def check_detector_input_size(model: nn.Module, input_size: int | None) -> tuple[int, int]:
    """A detector's (height, width): its own size; another `input_size` is refused in one line (its anchors, and
    the head's output count, are those of its size)."""
    from .detection import input_size as detector_size

    height, width = detector_size(model)
    if input_size is not None and (int(input_size), int(input_size)) != (height, width):
        raise UserError(f"--input-size {input_size}: a detector is exported at its own size, {height}x{width} "
                        "(its anchors depend on it); build the model with size= for another one")
    return height, width


def _export_detector(model: nn.Module, output: str | os.PathLike, fmt: ExportFormat, *, input_size: int | None,
                     batch: int | None, opset: int, metadata: dict[str, str] | None, tolerance: float,
                     images: Any) -> ExportReport:
    """`export_model` for an SSDLite detector: `detection.SSDLiteRaw` with its anchors, at the model's own size
    (see the module docstring)."""
    from . import detection  # torchvision's detection package: on use

    height, width = check_detector_input_size(model, input_size)
    if not 7 <= opset <= 23:
        raise UserError(f"--opset must be between 7 and 23, got {opset}")
    if metadata is None:
        metadata = artifact_metadata(model, Preprocessing(), model.class_names)
    if fmt is ExportFormat.EXECUTORCH:
        metadata = {"quantization": "none", **metadata}  # what write_pte stores: a float32 program
    in_chans = len(model.transform.image_mean)
    unfused = copy.deepcopy(model).cpu().eval()
    fused = fuse_batchnorm(unfused, sequential=True)  # torchvision's Conv2dNormActivation blocks too
    folded = count_batchnorms(unfused) - count_batchnorms(fused)
    reference = detection.SSDLiteRaw(unfused, with_anchors=True).eval()
    exported = detection.SSDLiteRaw(fused, with_anchors=True).eval()
    example = torch.rand(batch or 2, in_chans, height, width, generator=torch.Generator().manual_seed(0))
    batch_sizes = verification_batch_sizes(batch)
    pixels = Preprocessing(input_size=height, crop_pct=1.0, mean=(0.0,) * in_chans, std=(1.0,) * in_chans,
                           in_chans=in_chans)  # the artifact takes pixels in [0, 1]: normalising is the identity
    batches = verification_inputs(pixels, (height, width), batch_sizes, images)
    real_images = min(len(images) if images is not None else 0, sum(batch_sizes))
    output = Path(output)
    created = missing_folders(output.parent)
    output.parent.mkdir(parents=True, exist_ok=True)
    result: list[Comparison] = []

    def write_and_verify(tmp: str) -> None:
        tmp_path = Path(tmp)
        if fmt is ExportFormat.ONNX:
            _write_onnx(exported, tmp_path, example, batch is None, opset, metadata,
                        output_names=detection.OUTPUT_NAMES)
        elif fmt is ExportFormat.TORCHSCRIPT:
            _write_torchscript(exported, tmp_path, metadata, example=example)
        elif fmt is ExportFormat.EXECUTORCH:
            _write_executorch(exported, tmp_path, example, metadata)
        else:
            _write_exported_program(exported, tmp_path, example, batch is None, metadata)
        try:
            result.append(verify_artifact(reference, load_artifact(tmp_path, fmt, all_outputs=True), batches,
                                          tolerance=tolerance, name=f"the {fmt.value} export",
                                          names=detection.OUTPUT_NAMES))
        except ExportVerificationError as error:
            raise ExportVerificationError(f"{error}; nothing was written to {output}") from None

    try:
        atomic_write(output, write_and_verify)
    except BaseException:
        remove_empty_folders(created)
        raise
    comparison = result[0]
    report = ExportReport(output, fmt, height, batch, batch_sizes, comparison.artifact_diff, tolerance,
                          comparison.scale, folded, metadata, eager_float32_diff=comparison.eager_diff,
                          real_images=real_images, task="detection", checked_sizes=((height, width),),
                          outputs=dict(zip(comparison.names, comparison.parts)))
    logger.debug("wrote %s (%s detector, batch %s, %d BatchNorms folded)", output, fmt.value,
                 "dynamic" if batch is None else batch, folded)
    return report
