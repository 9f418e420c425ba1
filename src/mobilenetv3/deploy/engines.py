"""Inference engines behind `predict` and `bench`: eager PyTorch, ONNX Runtime and ExecuTorch, plus the export cache.

An engine is a callable `images (N, C, H, W float32 numpy) -> logits (N, classes)` with `.metadata`.  ONNX
Runtime (`runtime.OnnxRuntimeEngine`) runs an ONNX export of the weights, cached under `cache_dir()` by the
weights file's sha256 (and the input size), so only the first call on a set of weights pays for the export.
ExecuTorch runs a `.pte` program the user exported (`mobilenetv3 export --format executorch`, or
`mobilenetv3 quantize`); it is the optional `[mobile]` extra.

Layering: this module builds on `runtime` (torch-free) and calls `export` and `weights` only when it must
export or run eager PyTorch; `export` never imports this module.  Those calls import torch inside the
function, so that `predict` on a cached export never imports torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..allocator import keep_freed_memory
from ..errors import UserError, first_line
from ..files import cache_dir, file_sha256
from .executorch import load_pte
from .predict import load_samples
from .runtime import (
    EXPORT_VERSION,
    ONNXRUNTIME_MISSING,
    OnnxRuntimeEngine,
    check_weights_file,
    onnxruntime_available,
)

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "executorch")


class ExecuTorchEngine:
    """An ExecuTorch `.pte` program (XNNPACK-delegated, float32 or int8), run by ExecuTorch's runtime.

    Its batch size is fixed: other batch sizes are run in chunks of it, the last one padded with zeros.
    """

    name = "executorch"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.program = load_pte(self.path, threads=threads)
        self.metadata: dict[str, str] = dict(self.program.metadata)
        #: the program's batch size (always fixed for a .pte).
        self.fixed_batch: int = self.program.fixed_batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.program(images)

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        """Every output on one batch of exactly `fixed_batch` images (a detector's three outputs)."""
        return self.program.run_all(images)


class TorchEngine:
    """Eager PyTorch with BatchNorm folded; on a GPU it uses CUDA (and channels_last)."""

    name = "torch"

    def __init__(self, model: Any, *, device: str | None = None) -> None:
        import torch  # the torch engine only: predict on a cached ONNX export never imports torch

        from .fuse import fuse_batchnorm  # imports torch

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.memory_format = memory_format
        self.model = fuse_batchnorm(model).to(self.device, memory_format=memory_format)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run_all(images)[0]

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        """Every output: [logits], or a detector's (`detection.SSDLiteRaw`) bbox_regression, cls_logits and anchors."""
        torch = self.torch
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            output = self.model(batch)
            if isinstance(output, dict):  # a segmentation model: {"out": logits (N, classes, H, W)}
                output = output["out"]
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            return [tensor.float().cpu().numpy() for tensor in outputs]


def cached_onnx_export(weights_path: str | os.PathLike, input_size: int | None = None, *,
                       images: Sequence[str | os.PathLike] = ()) -> Path:
    """The path of a verified ONNX export of a weights file / checkpoint, exporting it on first use.

    Keyed by the file's sha256, the input size and `EXPORT_VERSION`; written atomically, so concurrent
    callers never see a partial file.  `images` (paths): a few of the user's images, on which the export
    is verified (see `export.verification_inputs`).
    """
    weights_path = Path(weights_path)
    check_weights_file(weights_path)
    digest = file_sha256(weights_path)
    size_tag = f"-{input_size}" if input_size else ""
    target = cache_dir() / "onnx" / f"{digest[:24]}{size_tag}-v{EXPORT_VERSION}.onnx"
    if target.is_file():
        logger.debug("using cached export %s", target)
        return target
    # A cache miss: exporting needs torch, which a cache hit never imports.
    from ..weights.io import load_model
    from .export import (ExportFormat, artifact_metadata, check_detector_input_size, export_model, model_task,
                         verification_batch_sizes)

    model = load_model(weights_path)  # a file that is not valid weights fails here, before any announcement
    detector = model_task(model) == "detection"
    if detector:  # its own size, always (the anchors depend on it)
        size = check_detector_input_size(model, input_size)[0]
    else:
        size = int(input_size or model.preprocessing.input_size)
    preprocessing = model.preprocessing.replace(input_size=size)
    metadata = artifact_metadata(model, preprocessing, model.class_names, digest)
    logger.info("exporting %s to ONNX once (cached at %s)", weights_path, target)
    try:
        count = sum(verification_batch_sizes(None))
        if detector:
            from .detection import input_size as detector_size, load_samples as detector_samples

            samples = detector_samples(images, detector_size(model), len(model.transform.image_mean), count)
        else:
            samples = load_samples(images, preprocessing, count)
        export_model(model, target, ExportFormat.ONNX, input_size=None if detector else size, metadata=metadata,
                     images=samples)
    except Exception as error:  # ExportVerificationError, an exporter failure, a full disk, ...
        raise ExportUnavailable(f"the ONNX export of {weights_path} failed: {first_line(error)}") from error
    return target


class ExportUnavailable(RuntimeError):
    """`cached_onnx_export` could not make or verify the export (the weights themselves loaded fine)."""


def make_engine(name: str, weights_path: str | os.PathLike, *, input_size: int | None = None,
                threads: int | None = None,
                images: Sequence[str | os.PathLike] = ()) -> Callable[[np.ndarray], np.ndarray]:
    """Build `name` ("auto", "torch", "onnxruntime", "executorch") for a weights file, training checkpoint,
    .onnx file or .pte program (which only "executorch", or "auto", runs).

    The returned engine has `.metadata` (weights-file vocabulary: preprocessing, class_names, ...).
    `images`: a few of the inputs, to verify a new ONNX export on.  When the export cannot be made or
    fails its verification, this says so in one warning and returns the torch engine: the user asked for
    predictions, which eager PyTorch gives (a bad weights file is still an error: it fails either way).
    """
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    weights_path = Path(weights_path)
    kind = check_weights_file(weights_path)
    is_onnx = kind == "onnx"
    if kind == "executorch" and name in ("auto", "executorch"):
        engine = ExecuTorchEngine(weights_path, threads=threads)
        size = engine.program.input_shape[-1]
        if input_size is not None and int(input_size) != size:
            raise UserError(f"{weights_path} was exported for {size}px inputs, not {input_size}; "
                            "export it again with --input-size")
        return engine
    if kind == "executorch":
        raise UserError(f"{weights_path} is an ExecuTorch program: use --engine executorch (or auto)")
    if name == "executorch":
        raise UserError(f"--engine executorch runs .pte programs; export {weights_path} with "
                        "`mobilenetv3 export --format executorch` first")
    if name == "auto":
        name = "onnxruntime" if (is_onnx or onnxruntime_available()) else "torch"
    if name == "onnxruntime":
        if not onnxruntime_available():  # asked for by name: a missing runtime is the user's to fix
            raise UserError(ONNXRUNTIME_MISSING)
        if is_onnx:
            return OnnxRuntimeEngine(weights_path, threads=threads)
        try:
            path = cached_onnx_export(weights_path, input_size, images=images)
        except ExportUnavailable as error:
            logger.warning("%s; running eager PyTorch instead", error)
        else:
            return OnnxRuntimeEngine(path, threads=threads)
    if is_onnx:
        raise UserError(f"{weights_path} is an ONNX file: use --engine onnxruntime (or auto)")
    # The torch engine: torch is imported here, not on the ONNX Runtime path.
    import torch

    from ..weights.io import load_model
    from .export import artifact_metadata, check_detector_input_size, model_task

    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()  # a predict process: no page faults on every batch (see mobilenetv3/allocator.py)
    model = load_model(weights_path)
    if model_task(model) == "detection":  # the network up to its raw outputs and the anchors, as an export
        from .detection import SSDLiteRaw

        check_detector_input_size(model, input_size)
        engine = TorchEngine(SSDLiteRaw(model, with_anchors=True))
    else:
        engine = TorchEngine(model)
    preprocessing = model.preprocessing.replace(input_size=input_size) if input_size else model.preprocessing
    engine.metadata = artifact_metadata(model, preprocessing, model.class_names)
    return engine
