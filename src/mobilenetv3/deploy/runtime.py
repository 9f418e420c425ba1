"""What `predict` needs on a cache hit, torch-free: the file-kind check, the ONNX Runtime session and engine,
the thread split, and the metadata an export carries (its preprocessing and class names).

Nothing here imports torch, at module level or later: with a cached ONNX export, `predict` runs on ONNX
Runtime, PIL and numpy alone.  `engines` (the torch engine and the export cache) and `export` build on this
module; it imports neither.
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError, first_line
from ..files import missing_file_error
from ..preprocessing import Preprocessing

#: Bumped whenever the exported graph would change for the same weights (invalidates predict's cache).
EXPORT_VERSION = "1"
ONNXRUNTIME_MISSING = "onnxruntime is not installed: pip install 'mobilenetv3[onnx]', or use --engine torch"


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
    overlaps (measured by `benchmarks/predict_speed.py`).  Decoding gets a quarter of the CPUs (at least one).
    """
    cpus = available_cpus()
    workers = workers or max(1, cpus // 4)
    threads = threads or max(1, cpus - workers)
    return threads, workers


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None  # the optional [onnx] extra, not imported


def onnxruntime_session(path: str | os.PathLike, *, threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session with full graph optimisation, one intra-op thread per available CPU."""
    try:
        import onnxruntime as ort  # the optional [onnx] extra: imported when a session is made
    except ImportError:
        raise UserError(ONNXRUNTIME_MISSING) from None
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


class OnnxRuntimeEngine:
    """An ONNX file run by ONNX Runtime: images (N, C, H, W float32 numpy) -> logits (N, classes)."""

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

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        """Every output (a detector's bbox_regression, cls_logits and anchors) on `images` as given: a fixed
        batch size is the caller's to meet (`detection.run_outputs` pads)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})


# --- what a file is ---------------------------------------------------------------------------------------

#: First bytes of a flatbuffer `.pte`: a 4-byte root offset, then the file identifier "ET" + 2 digits.
PTE_IDENTIFIER = b"ET"
#: First bytes of files people pass by mistake, so the error can say what the file is.
_OTHER_FILES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
                (b"RIFF", "a RIFF file (WebP image?)"), (b"%PDF", "a PDF document"))


def check_pte_file(path: str | os.PathLike) -> Path:
    """`path` as a Path when it is a readable file that starts like an ExecuTorch program, else a UserError."""
    path = Path(path)
    if not path.is_file():
        what = "directory" if path.is_dir() else "file"
        raise UserError(f"{path} is a {what}, not an ExecuTorch program" if path.exists()
                        else f"no such ExecuTorch program: {path}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    if len(head) < 8 or head[4:6] != PTE_IDENTIFIER:
        raise UserError(f"{path} is not an ExecuTorch program (.pte): no ExecuTorch header")
    return path


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


# --- what an export carries -------------------------------------------------------------------------------

def metadata_preprocessing(metadata: dict[str, str], source: str | os.PathLike) -> Preprocessing:
    """The preprocessing stored in an artifact's metadata; a `UserError` naming `source` when it has none."""
    if "preprocessing" not in metadata:
        raise UserError(f"{source} carries no preprocessing metadata (export it with `mobilenetv3 export`)")
    return Preprocessing.from_dict(json.loads(metadata["preprocessing"]))


def task_for(metadata: dict[str, str]) -> str:
    """"segmentation", "detection" or "classification": the export's "task", else told by the model name (LR-ASPP
    models are named lraspp_*, SSDLite ones ssdlite*), so that weights files and exports made before the key
    existed are read right."""
    if metadata.get("task"):
        return metadata["task"]
    name = metadata.get("model_name", "")
    if name.startswith("lraspp_"):
        return "segmentation"
    return "detection" if name.startswith("ssdlite") else "classification"


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's 1000 class names, in the standard index order (shipped with the package)."""
    # Through the top-level package: resolving "mobilenetv3.data" would import that package (and torchvision).
    text = resources.files("mobilenetv3").joinpath("data", "imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def class_names_for(metadata: dict[str, str]) -> list[str] | None:
    """Names from the weights' metadata; ImageNet's for a 1000-class model without names; else None."""
    if metadata.get("class_names"):
        return list(json.loads(metadata["class_names"]))
    if int(metadata.get("num_classes", 0)) == 1000:
        return imagenet_class_names()
    return None
