"""Inference engines behind `predict` and `bench`: eager PyTorch, ONNX Runtime and ExecuTorch, plus the export cache.

An engine is a callable `images (N, C, H, W float32 numpy) -> logits (N, classes)`.  ONNX Runtime
runs an ONNX export of the weights, cached under `cache_dir()` by the weights file's sha256 (and the
input size), so only the first call on a set of weights pays for the export.  ExecuTorch runs a `.pte`
program the user exported (`mobilenetv3 export --format executorch`, or `mobilenetv3 quantize`); it is
the optional `[mobile]` extra.

Nothing here imports torch at module level: with a cached export, `predict` runs on ONNX Runtime,
PIL and numpy alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UserError, first_line
from ..files import cache_dir, file_sha256, missing_file_error

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "executorch")
#: Bumped whenever the exported graph would change for the same weights (invalidates predict's cache).
EXPORT_VERSION = "1"


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split_threads(workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(engine threads, decoding threads) that together use each available CPU once.

    Oversubscribing is expensive: both ONNX Runtime's and PyTorch's (OpenMP) pools spin-wait between
    parallel regions, so a decoding thread sharing their cores slows inference down far more than it
    overlaps.  Measured on 2 CPUs, 512 JPEGs: torch engine 40 s with 2 + 2 threads, 8.6 s with 1 + 1;
    ONNX Runtime 8.4 s against 6.6 s.  Decoding gets a quarter of the CPUs (at least one).
    """
    cpus = available_cpus()
    workers = workers or max(1, cpus // 4)
    threads = threads or max(1, cpus - workers)
    return threads, workers


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_session(path: str | os.PathLike, *, threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session with full graph optimisation, one intra-op thread per available CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'mobilenetv3[onnx]', or use --engine torch") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cpus()
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # ORT raises its own exception types (InvalidGraph, Fail, NoSuchFile)
        raise UserError(f"ONNX Runtime cannot load {path}: {first_line(error)}") from None


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = onnxruntime_session(self.path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        batch = self.session.get_inputs()[0].shape[0]
        #: the export's fixed batch size (an int dimension), or None for a dynamic batch axis.
        self.fixed_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        run = lambda batch: self.session.run(None, {self.input_name: batch})[0]  # noqa: E731
        return run(images) if self.fixed_batch is None else run_in_fixed_batches(run, images, self.fixed_batch)


def run_in_fixed_batches(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, size: int) -> np.ndarray:
    """`run` (a program with a fixed batch `size`) over any number of images: chunks of exactly `size`, the
    last one padded with zeros whose outputs are dropped (an empty input runs one padded batch for the shape)."""
    count = len(images)
    if count == size:
        return run(images)
    padding = (-count) % size if count else size
    padded = np.concatenate([images, np.zeros((padding, *images.shape[1:]), dtype=np.float32)])
    outputs = [run(padded[start:start + size]) for start in range(0, len(padded), size)]
    return np.concatenate(outputs)[:count]


class ExecuTorchEngine:
    """An ExecuTorch `.pte` program (XNNPACK-delegated, float32 or int8), run by ExecuTorch's runtime.

    Its batch size is fixed: other batch sizes are run in chunks of it, the last one padded with zeros.
    """

    name = "executorch"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        from .executorch import load_pte

        self.path = Path(path)
        self.program = load_pte(self.path, threads=threads)
        self.metadata: dict[str, str] = dict(self.program.metadata)
        #: the program's batch size (always fixed for a .pte).
        self.fixed_batch: int = self.program.fixed_batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.program(images)


class TorchEngine:
    """Eager PyTorch with BatchNorm folded; on a GPU it uses CUDA (and channels_last)."""

    name = "torch"

    def __init__(self, model: Any, *, device: str | None = None) -> None:
        import torch

        from .fuse import fuse_batchnorm

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.memory_format = memory_format
        self.model = fuse_batchnorm(model).to(self.device, memory_format=memory_format)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self.torch
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            return self.model(batch).float().cpu().numpy()


#: First bytes of files people pass by mistake, so the error can say what the file is.
_OTHER_FILES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
                (b"RIFF", "a RIFF file (WebP image?)"), (b"%PDF", "a PDF document"))


def check_weights_file(path: str | os.PathLike) -> str:
    """What `path` is ("onnx", "executorch", "safetensors" or "checkpoint"), judged from its name and first bytes.

    Called before any work is announced or done (hashing, exporting), so `predict --checkpoint cat.png`
    is one clear line rather than "exporting cat.png to ONNX" and then a failure.  A missing file, a
    directory, or a file of another kind is a `UserError`.  Cheap and torch-free: the full check is the
    loading itself (`weights.io`), which also refuses pickles that would run code.
    """
    path = Path(path)
    is_onnx = path.suffix.lower() == ".onnx"
    if path.suffix.lower() == ".pte":
        from .executorch import check_pte_file

        check_pte_file(path)  # there, a file, its header; ExecuTorch's loading checks the rest
        return "executorch"
    if not path.is_file():
        raise missing_file_error(path, "ONNX file" if is_onnx else "weights file")
    if is_onnx:
        return "onnx"  # ONNX Runtime's own loading says best what is wrong with one
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:  # permission denied, an I/O error
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    other = next((what for magic, what in _OTHER_FILES if head.startswith(magic)), None)
    if path.suffix.lower() == ".safetensors":
        if head[8:9] == b"{":  # an 8-byte header length, then the JSON header
            return "safetensors"
        raise UserError(f"{path} is not a readable safetensors file ({other or 'no safetensors header'})")
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        return "checkpoint"
    if other:
        raise UserError(f"{path} is {other}, not a weights file (.safetensors), training checkpoint or .onnx export")
    raise UserError(f"{path} is not a readable PyTorch checkpoint (neither a zip archive nor a pickle)")


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
    from ..weights.io import load_model
    from .export import ExportFormat, artifact_metadata, export_model, verification_batch_sizes
    from .predict import load_samples

    model = load_model(weights_path)  # a file that is not valid weights fails here, before any announcement
    size = int(input_size or model.preprocessing.input_size)
    preprocessing = model.preprocessing.replace(input_size=size)
    metadata = artifact_metadata(model, preprocessing, model.class_names, digest)
    logger.info("exporting %s to ONNX once (cached at %s)", weights_path, target)
    try:
        samples = load_samples(images, preprocessing, sum(verification_batch_sizes(None)))
        export_model(model, target, ExportFormat.ONNX, input_size=size, metadata=metadata, images=samples)
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
            raise UserError("onnxruntime is not installed: pip install 'mobilenetv3[onnx]', or use --engine torch")
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
    import torch

    from ..allocator import keep_freed_memory
    from ..weights.io import load_model
    from .export import artifact_metadata

    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()  # a predict process: no page faults on every batch (see mobilenetv3/allocator.py)
    model = load_model(weights_path)
    engine = TorchEngine(model)
    preprocessing = model.preprocessing.replace(input_size=input_size) if input_size else model.preprocessing
    engine.metadata = artifact_metadata(model, preprocessing, model.class_names)
    return engine
