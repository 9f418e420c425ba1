"""ExecuTorch (`.pte`) programs: write an XNNPACK-delegated program, read its metadata back, run it.

ExecuTorch is PyTorch's on-device runtime; `.pte` is its program format, run on Android / iOS / Linux by
its C++ runtime and, here, by its Python bindings (`executorch.runtime.Runtime`).  It is an optional
extra (`pip install 'mobilenetv3[mobile]'`): nothing in the package imports it at module level, and
every entry point that needs it calls `require_executorch` first, which raises a one-line `UserError`.

Metadata is embedded, not a sidecar.  ExecuTorch programs may carry *constant methods*: named methods
with no inputs that return constants stored in the program (strings included).  `write_pte` stores the
metadata (the weights-file vocabulary of `export.artifact_metadata`, plus "quantization": "none" or
"int8") as one JSON string returned by the method `mobilenetv3_metadata`; `read_pte_metadata` runs it.
So a `.pte` can be moved, copied or renamed alone, and the on-device runtime simply ignores the extra
method (an app may read it too: `module.execute("mobilenetv3_metadata")`).

Batch size: a program is exported at a fixed batch size (ExecuTorch plans every buffer at its upper
bound; with a dynamic batch dimension, torch 2.14 / executorch 1.5.1 planned a smaller bound than the one
asked for -- 15 for max=64 on MobileNetV3-Small -- and refused larger batches at run time, so a dynamic
batch is not offered).  `load_pte` feeds a program batches of exactly its size, padding the last one
with zeros and dropping the padded outputs, like `runtime.OnnxRuntimeEngine` does for fixed-batch ONNX.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import UserError, first_line
from ..preprocessing import Preprocessing
from .runtime import check_pte_file, run_in_fixed_batches

logger = logging.getLogger(__name__)

MOBILE_EXTRA_HINT = "pip install 'mobilenetv3[mobile]'"
#: The constant method holding the JSON metadata inside a `.pte`.
METADATA_METHOD = "mobilenetv3_metadata"


def executorch_available() -> bool:
    """Whether ExecuTorch's exporter and runtime import (without importing them now)."""
    try:
        return importlib.util.find_spec("executorch") is not None \
            and importlib.util.find_spec("executorch.runtime") is not None
    except (ImportError, ValueError):
        return False


def require_executorch(what: str) -> None:
    """Raise a one-line `UserError` naming the extra when ExecuTorch is not installed."""
    if not executorch_available():
        raise UserError(f"{what} needs ExecuTorch: {MOBILE_EXTRA_HINT}")


def require_quantization(what: str) -> None:
    """`require_executorch`, and torchao (PT2E quantization) too: one `UserError` naming the extra."""
    require_executorch(what)
    try:
        found = importlib.util.find_spec("torchao") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError(f"{what} needs torchao: {MOBILE_EXTRA_HINT}")


@contextlib.contextmanager
def _quiet_imports():
    """ExecuTorch warns that its Python API is experimental, and torchao logs a pytree deprecation, on import."""
    pytree_logger = logging.getLogger("torch.utils._pytree")
    level = pytree_logger.level
    pytree_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*experimental.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        pytree_logger.setLevel(level)


#: A line of ExecuTorch's C++ logging ("[program.cpp:114] File size is too small ...").
_NATIVE_LOG_LINE = re.compile(r"^\[[\w.]+\.(?:cpp|cc|c|h):\d+\] ")


@contextlib.contextmanager
def _native_logs_to_debug():
    """ExecuTorch's runtime logs to stderr (CPU probing on the first XNNPACK method, the reason a program
    failed to load), through file descriptor 2 or, from its Python bindings, through `sys.stderr`: capture
    both while loading, and log its lines at DEBUG, so a command's stderr keeps to what matters (our
    UserError says why a load failed).  Other text written meanwhile is passed on."""
    python_stderr = sys.stderr
    with contextlib.suppress(Exception):
        python_stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2
        saved = None
    with tempfile.TemporaryFile() as capture:
        if saved is not None:
            os.dup2(capture.fileno(), 2)
        sys.stderr = buffer = io.StringIO()
        try:
            yield
        finally:
            sys.stderr = python_stderr
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace") + buffer.getvalue()
            for line in text.splitlines():
                if _NATIVE_LOG_LINE.match(line):
                    logger.debug("executorch: %s", line)
                elif line.strip():
                    print(line, file=python_stderr)


def _runtime():
    with _quiet_imports():
        try:
            from executorch.runtime import Runtime  # optional [mobile] extra
        except ImportError:
            raise UserError(f"running a .pte program needs ExecuTorch: {MOBILE_EXTRA_HINT}") from None
        return Runtime.get()


def write_pte(program: Any, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Lower a `torch.export.ExportedProgram` to an XNNPACK-delegated ExecuTorch program at `path`.

    `metadata` (string values) is embedded as the constant method `METADATA_METHOD`; "quantization"
    defaults to "none".  The caller makes the write atomic (`weights.io.atomic_write` with a temp path).
    """
    require_executorch("writing a .pte program")
    with _quiet_imports():  # the optional [mobile] extra
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    stored = {"quantization": "none", **{str(k): str(v) for k, v in metadata.items()}}
    with _quiet_imports():
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           constant_methods={METADATA_METHOD: json.dumps(stored, sort_keys=True)})
        executorch_program = edge.to_executorch()
    with open(path, "wb") as handle:
        executorch_program.write_to_file(handle)


def _load_program(path: str | os.PathLike):
    path = check_pte_file(path)
    runtime = _runtime()
    try:
        data = path.read_bytes()  # held by the program: a file replaced or deleted later does not matter
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        with _native_logs_to_debug():
            return runtime.load_program(data)
    except Exception as error:  # the bindings raise RuntimeError with the runtime's error code
        raise UserError(f"ExecuTorch cannot load {path}: {first_line(error)}") from None


def _program_metadata(program, path: Path) -> dict[str, str]:
    if METADATA_METHOD not in program.method_names:
        return {}
    try:
        with _native_logs_to_debug():
            (value,) = program.load_method(METADATA_METHOD).execute([])
        metadata = json.loads(value)
    except (RuntimeError, TypeError, ValueError) as error:  # a foreign program's method of that name
        raise UserError(f"{path}: its {METADATA_METHOD} method does not return mobilenetv3's JSON metadata "
                        f"({type(error).__name__})") from None
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: its {METADATA_METHOD} method does not return mobilenetv3's JSON metadata")
    return {str(key): str(value) for key, value in metadata.items()}


def read_pte_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata `write_pte` embedded ({} for a program written by something else)."""
    return _program_metadata(_load_program(path), Path(path))


#: Whether a program's methods were loaded in this process: they keep a raw pointer to the thread pool.
_METHODS_LOADED = False


def set_threads(threads: int | None) -> None:
    """Size ExecuTorch's shared thread pool (XNNPACK's), process-wide; None keeps its default (one per core).

    Only before the first method is loaded: resetting the pool destroys the old one, which every XNNPACK
    method loaded before still points to.  Later, another count is refused with a warning.
    """
    if not threads:
        return
    with _quiet_imports():
        from executorch.extension.pybindings import portable_lib  # optional [mobile] extra
    try:
        with _native_logs_to_debug():  # the first call creates the pool, which logs its CPU probing to stderr
            current = portable_lib._threadpool_get_thread_count()
        if current == threads:
            return
        if _METHODS_LOADED:
            logger.warning("ExecuTorch already runs %d threads in this process; %d asked for now is ignored "
                           "(its thread pool can only be sized before the first program runs)", current, threads)
            return
        with _native_logs_to_debug():
            portable_lib._unsafe_reset_threadpool(int(threads))
    except Exception as error:  # an experimental API: a failure costs speed, not correctness
        logger.warning("cannot set ExecuTorch's thread count to %d: %s", threads, error)


class PteProgram:
    """A loaded `.pte` program as a callable images (N, C, H, W float32 numpy) -> logits (N, classes).

    Attributes: `path`, `metadata` (see `read_pte_metadata`), `fixed_batch` (the program's batch size),
    `input_shape` (its full input shape).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.program = _load_program(self.path)
        if "forward" not in self.program.method_names:
            raise UserError(f"{self.path} has no 'forward' method (it has {', '.join(sorted(self.program.method_names))})")
        self.metadata = _program_metadata(self.program, self.path)
        set_threads(threads)
        global _METHODS_LOADED
        _METHODS_LOADED = True
        try:
            with _native_logs_to_debug():
                self.method = self.program.load_method("forward")
        except RuntimeError as error:  # a delegate or kernel this runtime lacks, a corrupt segment
            raise UserError(f"ExecuTorch cannot load the forward method of {self.path}: {first_line(error)}") from None
        meta = self.method.metadata
        if meta.num_inputs() != 1:
            raise UserError(f"{self.path} takes {meta.num_inputs()} inputs, not one image batch")
        self.input_shape = tuple(int(s) for s in meta.input_tensor_meta(0).sizes())
        if len(self.input_shape) != 4:
            raise UserError(f"{self.path} takes a {len(self.input_shape)}-d input, not an N x C x H x W image batch")
        self.fixed_batch = self.input_shape[0]
        import torch  # on use only: importing this module (predict's ONNX path) stays torch-free

        self._torch = torch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (output,) = self.method.execute([self._torch.from_numpy(batch)])[:1]
        # The runtime returns a view of its own output buffer (reused by the next call): copy it out.
        return np.array(output.numpy(), dtype=np.float32, copy=True)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape[1:]:
            raise UserError(f"{self.path} takes images of shape {self.input_shape[1:]}, got {tuple(images.shape[1:])}")
        return run_in_fixed_batches(self._run, images, self.fixed_batch)

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        """Every output of the program (a detector's bbox_regression, cls_logits and anchors) on one batch of
        exactly its fixed size (`detection.run_outputs` pads)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if tuple(images.shape) != self.input_shape:
            raise UserError(f"{self.path} takes one batch of shape {self.input_shape}, got {tuple(images.shape)}")
        outputs = self.method.execute([self._torch.from_numpy(images)])
        # views of the runtime's own output buffers (reused by the next call): copied out
        return [np.array(output.numpy(), dtype=np.float32, copy=True) for output in outputs]


def load_pte(path: str | os.PathLike, *, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function images (N, C, H, W float32) -> logits, run by ExecuTorch's runtime (see `PteProgram`)."""
    require_executorch(f"running {Path(path).name}")
    return PteProgram(path, threads=threads)


def pte_module(program: PteProgram):
    """A `torch.nn.Module` (no parameters) running `program` on CPU tensors: for code that takes a model,
    such as `train.loop.evaluate`.  Outputs come back on the input's device."""
    import torch  # on use only: importing this module stays torch-free
    from torch import nn

    class PteModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.program = program

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            size, given = tuple(program.input_shape[-2:]), tuple(images.shape[-2:])
            if given != size:  # e.g. a segmentation folder's images, which keep their own sizes
                raise UserError(f"{program.path} takes {size[0]}x{size[1]} images, got {given[0]}x{given[1]}: "
                                "evaluate the weights it was exported from instead")
            logits = program(images.detach().float().cpu().contiguous().numpy())
            return torch.from_numpy(logits).to(images.device)

    return PteModule()


def pte_weights(program: PteProgram):
    """A `weights.io.LoadedWeights` (no tensors) describing `program` from its metadata: model name and
    kwargs, preprocessing, class names; a UserError when the program carries no such metadata."""
    from ..weights.io import LoadedWeights  # imports torch: on use only

    metadata = program.metadata
    missing = [key for key in ("model_name", "preprocessing") if key not in metadata]
    if missing:
        raise UserError(f"{program.path} carries no {' or '.join(missing)} metadata "
                        "(export it with `mobilenetv3 export --format executorch`)")
    try:
        kwargs = json.loads(metadata.get("model_kwargs", "{}"))
        preprocessing = Preprocessing.from_dict(json.loads(metadata["preprocessing"]))
        class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(f"{program.path} has unreadable metadata: {error}") from None
    extra = {"quantization": metadata.get("quantization", "none")}
    return LoadedWeights(program.path, metadata["model_name"], kwargs, {}, preprocessing, class_names, extra)
