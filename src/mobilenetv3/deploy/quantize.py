"""int8 quantization to an ExecuTorch program: post-training (`mobilenetv3 quantize`) and the QAT graph.

The PT2E flow, with the XNNPACK quantizer:

  torch.export (float32, eval mode, dynamic batch)  ->  torchao `prepare_pt2e(XNNPACKQuantizer)`
  ->  calibration batches on the CPU  ->  `convert_pt2e`  ->  torch.export (fixed batch)
  ->  `executorch.write_pte` (lowered to the XNNPACK delegate)

The scheme (`QUANTIZATION_SCHEME`) is XNNPACK's symmetric int8: per-channel weights (a scale per output
channel, [-127, 127]), static per-tensor activations ([-128, 127], ranges from a histogram observer over the
calibration images).  `prepare_pt2e` folds every BatchNorm into its convolution before observing, so the
int8 weights are the folded ones.

How MobileNetV3's layers come out: convolutions (with a following ReLU fused), the classifier, residual adds
and the squeeze-excite product x * gate are int8 patterns of the quantizer.  Hard-swish, the SE's hard-sigmoid
gate and its spatial mean are not: ExecuTorch's XNNPACK backend takes hard-swish in float32 only and has no
hard-sigmoid op (it is decomposed into (x + 3), clamp to [0, 6], / 6), so they run in float32 between a
dequantize and a quantize, *inside* the XNNPACK delegate.  Measured (`ops_outside_delegate`,
benchmarks/mobile_speed.py): the whole network is one delegate call; what runs outside it are 0-d dtype casts
(`dim_order_ops::_to_dim_order_copy`) of the hard-sigmoid's two scalar constants, 2 per SE block: 16 kernel
calls for Large, 18 for Small, a few bytes each.

A fixed batch: the program takes batches of exactly that size (`load_pte` pads the last one); ExecuTorch 1.5.1
plans a dynamic batch's buffers below the asked bound (see `deploy/executorch.py`).

Before the file is kept, it is loaded back with ExecuTorch's runtime and run beside the eager float32 model
on the evaluation images (the data's validation split; without them, the calibration images): the float32 and
int8 top-1 accuracies (when labels fit the classifier) and the fraction of images on which both predict the
same class ("agreement").  Agreement below `min_agreement` raises `QuantizationVerificationError` and leaves no
file (see DEFAULT_MIN_AGREEMENT for the threshold).

Quantization-aware training (QAT) uses the same scheme with fake quantization (`prepare_qat`: torch.export of
the network in train mode, then torchao's `prepare_qat_pt2e`).  The prepared graph is an `nn.Module` the trainer
fine-tunes like any other (`mobilenetv3 train --qat`); `qat_to_pte` converts it to the same int8 program and
verifies it against the fake-quantized model it came from.  A QAT training checkpoint holds that graph's state
dict (`qat_state_dict`); the graph rebuilt from the network's name and kwargs is the same, so it loads back
(`train --resume`, and `qat_model_from_checkpoint` for `mobilenetv3 quantize`).
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..errors import UserError
from ..factory import create_model
from ..preprocessing import Preprocessing
from ..weights.io import atomic_write, load_state_with_own_versions
from .executorch import _quiet_imports, load_pte, require_executorch, write_pte
from .export import DYNAMIC_BATCH, model_task

#: Why a detector is refused: the int8 pipeline calibrates and checks (top-1 agreement) a logits output.
DETECTOR_REFUSED = ("int8 quantization does not support detectors (SSDLite): its calibration and top-1 agreement "
                    "check are for one logits output; export the detector in float32 instead "
                    "(mobilenetv3 export --format executorch, or onnx)")


def refuse_detector(model: nn.Module) -> None:
    """A one-line `UserError` (`DETECTOR_REFUSED`) for an SSDLite detector."""
    if model_task(model) == "detection":
        raise UserError(DETECTOR_REFUSED)

logger = logging.getLogger(__name__)

QUANTIZATION_SCHEME = ("xnnpack int8, per-channel symmetric weights, static per-tensor activations "
                       "(histogram observer), PT2E post-training")
QAT_SCHEME = ("xnnpack int8, per-channel symmetric weights, static per-tensor activations "
              "(moving-average min/max fake quantization), PT2E quantization-aware training")
DEFAULT_CALIBRATION_IMAGES = 512
DEFAULT_BATCH = 1
#: Calibration batches are this large (the prepared program has a dynamic batch).
CALIBRATION_BATCH_SIZE = 32
#: Refuse an int8 program whose top-1 agrees with float32's on fewer than this percentage of the images.
#: The check catches a *broken* program, not an accuracy loss: the command reports the accuracy cost for the
#: user to judge (MobileNetV3 is known to lose more to PTQ than most networks).  The criterion for the value:
#: below the agreement of every sound program and above that of every broken one (calibrated on the wrong
#: range, e.g. un-normalised pixels), including the hard case of a small network with small logit margins.
#: Sound programs' agreement is recorded by `benchmarks/quantization_accuracy.py` (docs/results.md); the sound
#: and broken hard cases are checked by tests/test_quantize.py.
DEFAULT_MIN_AGREEMENT = 50.0


class QuantizationVerificationError(RuntimeError):
    """The int8 program disagrees with the float32 model on too many images (see DEFAULT_MIN_AGREEMENT)."""


@dataclass
class Comparison:
    """float32 eager vs the int8 program on the evaluation images."""

    images: int = 0
    agree: int = 0  # images where both predict the same class
    labelled: int = 0  # images whose labels fit the classifier (top-1 is measured on these)
    float_correct: int = 0
    int8_correct: int = 0
    max_abs_diff: float = 0.0  # max |int8 logits - float32 logits|
    scale: float = 0.0  # max |float32 logits|

    @property
    def agreement(self) -> float:
        return 100.0 * self.agree / self.images if self.images else float("nan")

    @property
    def float_top1(self) -> float | None:
        return 100.0 * self.float_correct / self.labelled if self.labelled else None

    @property
    def int8_top1(self) -> float | None:
        return 100.0 * self.int8_correct / self.labelled if self.labelled else None

    def add(self, reference: np.ndarray, quantized: np.ndarray, labels: np.ndarray | None) -> None:
        if quantized.shape != reference.shape:
            raise QuantizationVerificationError(
                f"int8 program output shape {quantized.shape} != float32 {reference.shape}")
        if not np.isfinite(quantized).all():
            raise QuantizationVerificationError("the int8 program produced NaN or infinite logits")
        # torch.topk, as `eval`'s top-1 (train.loop.topk_hits): int8 logits tie often (the classifier's output
        # is quantized too), and argmax breaks ties differently (Fashion-MNIST Small: 14 ties in 10000, 3 flips)
        ref_top = torch.from_numpy(reference).topk(1, dim=1).indices[:, 0].numpy()
        q_top = torch.from_numpy(quantized).topk(1, dim=1).indices[:, 0].numpy()
        self.images += len(reference)
        self.agree += int((ref_top == q_top).sum())
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(quantized - reference).max(initial=0.0)))
        self.scale = max(self.scale, float(np.abs(reference).max(initial=0.0)))
        if labels is not None:
            self.labelled += len(labels)
            self.float_correct += int((ref_top == labels).sum())
            self.int8_correct += int((q_top == labels).sum())


@dataclass
class QuantizeReport:
    path: Path
    batch: int
    input_size: int
    calibration_images: int
    pte_bytes: int
    comparison: Comparison
    evaluated_on: str  # "validation" or "calibration": which images the comparison ran on
    min_agreement: float
    outside_delegate: dict[str, int] | None = None  # kernel calls outside the XNNPACK delegate, by operator
    delegates: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: what the int8 program was compared with: "float32" (PTQ) or "fake-quantized" (QAT's trained graph)
    reference: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        drop = None if c.float_top1 is None else c.float_top1 - c.int8_top1
        return {
            "path": str(self.path), "quantization": "int8", "scheme": self.metadata.get("quantization_scheme"),
            "reference": self.reference, "batch": self.batch,
            "input_size": self.input_size, "calibration_images": self.calibration_images,
            "evaluated_on": self.evaluated_on, "eval_images": c.images, "labelled_images": c.labelled,
            "float_top1": c.float_top1, "int8_top1": c.int8_top1, "top1_drop": drop,
            "agreement": c.agreement, "min_agreement": self.min_agreement, "max_abs_logit_diff": c.max_abs_diff,
            "max_abs_logit": c.scale, "pte_bytes": self.pte_bytes, "delegates": self.delegates,
            "outside_delegate": self.outside_delegate,
        }


def quantization_metadata(metadata: dict[str, str], calibration_images: int | None,
                          scheme: str = QUANTIZATION_SCHEME) -> dict[str, str]:
    """`metadata` (the `export.artifact_metadata` vocabulary) plus what says the program is int8, and how
    (`calibration_images`: None for QAT, whose ranges were learnt in training)."""
    stored = {**metadata, "quantization": "int8", "quantization_scheme": scheme}
    if calibration_images is not None:
        stored["calibration_images"] = str(int(calibration_images))
    return stored


def _quantizer(is_qat: bool = False):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (  # optional [mobile] extra
        XNNPACKQuantizer, get_symmetric_quantization_config)

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat))


def quantized_program(model: nn.Module, calibration: list[torch.Tensor], batch: int):
    """The int8 `torch.export.ExportedProgram` of `model` (float32, CPU), observed on `calibration`, at `batch`."""
    with _quiet_imports():  # torchao's import logs a torch pytree deprecation
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e  # optional [mobile] extra

    example = calibration[0][:1]
    with _quiet_imports():
        prepared = prepare_pt2e(_export_dynamic_batch(model, torch.cat([example, example])), _quantizer())
        with torch.no_grad():
            for images in calibration:
                prepared(images)
        return _int8_program(prepared, example.shape[1:], batch)


def _export_dynamic_batch(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.export's graph of `model` for any batch size: observing and QAT run batches of any size (the final
    program has a fixed one)."""
    return torch.export.export(model, (example,), dynamic_shapes=DYNAMIC_BATCH, strict=False).module()


def _int8_program(prepared: nn.Module, image_shape: tuple[int, ...], batch: int):
    """convert_pt2e (in place: observers / fake quantizers -> quantize and dequantize ops) and export at `batch`."""
    with _quiet_imports():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e  # optional [mobile] extra

        converted = convert_pt2e(prepared)
        fixed = torch.zeros((batch, *image_shape), dtype=torch.float32)
        return torch.export.export(converted, (fixed,), strict=False)


def prepare_qat(model: nn.Module, image_shape: tuple[int, int, int]) -> nn.Module:
    """The fake-quantized training graph of `model` (QAT): torch.export in train mode, with a dynamic batch, then
    `prepare_qat_pt2e` with XNNPACK's int8 QAT scheme.  It trains like a module, and `.train()` / `.eval()`
    switch its BatchNorm and dropout ops (`_switch_modes`).

    Its parameters keep the network's names; the fake quantizers add `activation_post_process_N` entries to the
    state dict.  Building it twice from equal networks gives equal graphs, so a saved state dict loads back.
    """
    refuse_detector(model)
    with _quiet_imports():
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e  # optional [mobile] extra

    was_training = model.training
    parameter = next(model.parameters())
    example = torch.zeros((2, *image_shape), dtype=parameter.dtype, device=parameter.device)
    with _quiet_imports():
        prepared = prepare_qat_pt2e(_export_dynamic_batch(model.train(), example), _quantizer(is_qat=True))
    model.train(was_training)
    _restore_batchnorm_settings(prepared, model)
    return _switch_modes(prepared)


def _restore_batchnorm_settings(graph: nn.Module, network: nn.Module) -> None:
    """Give the graph's BatchNorm ops their network's eps and momentum back.

    torchao 0.18's conv-BN QAT rewrite (`qat_utils`, "TODO: allow setting eps") builds every fused pattern with
    eps 1e-5 and momentum 0.1, in the batch_norm op and in the weight scale sqrt(running_var + eps).  Our
    networks use the paper's eps 1e-3 (and the config's momentum): left alone, QAT would start from another
    network than the float one and fold its BatchNorm with another eps.  Each op is found by the running-variance
    buffer it reads, which names its BatchNorm module.
    """
    norms = {f"{name}.running_var": module for name, module in network.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm)}
    aten = torch.ops.aten
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.batch_norm.default and getattr(node.args[4], "op", None) == "get_attr":
            norm = norms[node.args[4].target]
            momentum = 0.1 if norm.momentum is None else norm.momentum
            node.args = (*node.args[:6], momentum, norm.eps, *node.args[8:])
        elif (node.target is aten.add.Tensor and getattr(node.args[0], "op", None) == "get_attr"
              and node.args[0].target in norms and isinstance(node.args[1], float)):
            node.args = (node.args[0], norms[node.args[0].target].eps)
    graph.recompile()


def _fake_quantizers(graph: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    # every name: a quantizer shared by two inputs appears twice in the state dict
    return ((name, module) for name, module in graph.named_modules(remove_duplicate=False)
            if hasattr(module, "observer_enabled"))


def _switch_modes(graph: nn.Module) -> nn.Module:
    """`.train(mode)` / `.eval()` for an exported QAT graph, returning it.

    - BatchNorm and dropout are ops with a `training` argument, not modules with a flag: set that argument on
      each op.  (torchao's `allow_exported_model_train_eval` rewrites subgraph patterns instead; on torch
      2.14's export IR, `aten.batch_norm.default`, it matches none, so "eval" went on normalising with batch
      statistics, updating the running ones, and dropping out.)
    - torchao's fake quantizers observe whatever they see, in any mode: in eval they are paused, so the
      ranges come from training batches only (not from validation images, nor from the images the int8
      program is compared on); train() gives each back its own setting.  `qat_state_dict` reports that
      setting while paused, so a checkpoint written after validation resumes observing.
    """
    aten = torch.ops.aten
    flags = {aten.batch_norm.default: 5, aten.dropout.default: 2}

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        for node in self.graph.nodes:
            if node.op == "call_function" and node.target in flags:
                index = flags[node.target]
                node.args = (*node.args[:index], bool(mode), *node.args[index + 1:])
        self.recompile()
        for _, quantizer in _fake_quantizers(self):
            if not mode and not hasattr(quantizer, "observing_in_training"):
                quantizer.observing_in_training = int(quantizer.observer_enabled[0])
                quantizer.observer_enabled.fill_(0)
            elif mode and hasattr(quantizer, "observing_in_training"):
                quantizer.observer_enabled.fill_(quantizer.__dict__.pop("observing_in_training"))
        return self

    graph.train = types.MethodType(train, graph)
    graph.eval = types.MethodType(lambda self: self.train(False), graph)
    return graph.train(graph.training)


def qat_state_dict(graph: nn.Module) -> dict[str, torch.Tensor]:
    """The QAT graph's state dict as training left it (observers paused by eval() count as their own setting)."""
    state = dict(graph.state_dict())
    for name, quantizer in _fake_quantizers(graph):
        if hasattr(quantizer, "observing_in_training"):
            key = f"{name}.observer_enabled"
            state[key] = torch.full_like(state[key], quantizer.observing_in_training)
    return state


def freeze_observers(graph: nn.Module) -> None:
    """Stop updating every fake quantizer's range (activations, and the weights' per-channel ones); the fake
    quantization goes on.  A flag in the state dict, so a resumed run keeps it."""
    for _, quantizer in _fake_quantizers(graph):
        quantizer.observer_enabled.fill_(0)
        if hasattr(quantizer, "observing_in_training"):
            quantizer.observing_in_training = 0


def qat_model_from_checkpoint(weights) -> tuple[nn.Module, nn.Module]:
    """(float network, fake-quantized graph with the checkpoint's state) of a QAT training checkpoint read by
    `weights.io.read_weights` (its `extra["qat"]` holds the image shape the graph was traced with)."""
    shape = tuple(int(size) for size in weights.extra["qat"]["image_shape"])
    network = create_model(weights.model_name, **weights.model_kwargs)
    prepared = prepare_qat(network, shape)
    try:
        load_state_with_own_versions(prepared, weights.state_dict)
    except RuntimeError as error:
        raise UserError(f"{weights.path}: its QAT state does not fit the graph rebuilt from its model "
                        f"({str(error).splitlines()[0]})") from None
    return network, prepared.eval()


def ops_outside_delegate(path: str | os.PathLike) -> tuple[dict[str, int], int] | None:
    """({operator: kernel calls} outside the XNNPACK delegates, number of delegate calls) of a `.pte`, read
    from its serialized execution plan; None when this ExecuTorch cannot deserialize it (a private API)."""
    try:
        from executorch.exir._serialize._program import deserialize_pte_binary  # optional [mobile] extra

        program = deserialize_pte_binary(Path(path).read_bytes())
        program = getattr(program, "program", program)
        plan = next(p for p in program.execution_plan if p.name == "forward")
        calls: collections.Counter[str] = collections.Counter()
        delegates = 0
        for chain in plan.chains:
            for instruction in chain.instructions:
                args = instruction.instr_args
                kind = type(args).__name__
                if kind == "DelegateCall":
                    delegates += 1
                elif kind == "KernelCall":
                    calls[plan.operators[args.op_index].name] += 1
        return dict(calls), delegates
    except Exception as error:  # noqa: BLE001 - diagnostics only
        logger.debug("cannot read the execution plan of %s: %s", path, error)
        return None


def compare_program(model: nn.Module, program: Callable[[np.ndarray], np.ndarray],
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> Comparison:
    """Run eager float32 `model` and the int8 `program` on each (images, labels or None) batch."""
    comparison = Comparison()
    for images, labels in batches:
        if not len(images):
            continue
        images = images.detach().float().cpu().contiguous()
        with torch.inference_mode():
            reference = model(images).float().numpy()
        quantized = program(images.numpy())
        comparison.add(reference, quantized, None if labels is None else labels.cpu().numpy())
    return comparison


def _program_batch(batch: int | None) -> int:
    """The int8 program's fixed batch size (None: DEFAULT_BATCH), once ExecuTorch is known to be installed."""
    require_executorch("int8 quantization")
    batch = DEFAULT_BATCH if batch is None else int(batch)
    if batch < 1:
        raise UserError(f"the batch size must be positive, got {batch}")
    return batch


def quantize_to_pte(
    model: nn.Module,
    calibration_batches: Iterable[torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str],
    *,
    batch: int | None = DEFAULT_BATCH,
    evaluation: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    threads: int | None = None,
) -> QuantizeReport:
    """Quantize `model` to int8 on `calibration_batches` (normalised image batches N x C x R x R) and write an
    XNNPACK-delegated `.pte` at `path`, verified first (see the module docstring).

    `batch`: the program's fixed batch size (None: DEFAULT_BATCH).  `evaluation`: (images, labels) batches for
    the float32 / int8 comparison, labels None where they do not fit the classifier; default: the calibration
    images, unlabelled.  `metadata` is stored in the program with "quantization": "int8" and the scheme added.
    """
    refuse_detector(model)
    batch = _program_batch(batch)
    model = copy.deepcopy(model).cpu().float().eval()
    calibration = [images.detach().float().cpu().contiguous() for images in calibration_batches if len(images)]
    if not calibration:
        raise UserError("no calibration images: quantization needs at least one image")
    shape = tuple(calibration[0].shape[1:])
    if any(tuple(images.shape[1:]) != shape for images in calibration):
        raise UserError(f"calibration batches differ in image shape (first {shape})")
    if len(shape) != 3 or shape[1] != shape[2]:
        raise UserError(f"calibration images must be C x R x R, got {shape}")
    count = sum(len(images) for images in calibration)
    program = quantized_program(model, calibration, batch)
    return _write_verified(
        program, model, path, quantization_metadata(metadata, count), batch=batch, input_size=shape[-1],
        calibration_images=count, evaluation=evaluation, fallback=calibration, min_agreement=min_agreement,
        threads=threads, reference_label="float32")


def qat_to_pte(
    prepared: nn.Module,
    path: str | os.PathLike,
    metadata: dict[str, str],
    evaluation: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    batch: int | None = DEFAULT_BATCH,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    threads: int | None = None,
) -> QuantizeReport:
    """Convert a QAT graph (`prepare_qat`, trained) to an int8 `.pte` at `path`, verified against the
    fake-quantized graph itself on the `evaluation` (images, labels or None) batches; `prepared` is untouched."""
    batch = _program_batch(batch)
    # deepcopy keeps the graph but not its patched train() / eval(): switch the copy's own ops
    reference = _switch_modes(copy.deepcopy(prepared).cpu()).eval()  # the graph's own eval (running BatchNorm statistics, no dropout)
    evaluation = iter(evaluation)
    first = next(evaluation, None)
    if first is None:
        raise UserError("no evaluation images to compare the int8 program with the QAT model on")
    shape = tuple(first[0].shape[1:])
    program = _int8_program(copy.deepcopy(reference), shape, batch)
    return _write_verified(
        program, reference, path, quantization_metadata(metadata, None, QAT_SCHEME), batch=batch,
        input_size=shape[-1], calibration_images=0, evaluation=itertools.chain([first], evaluation), fallback=None,
        min_agreement=min_agreement, threads=threads, reference_label="fake-quantized")


def _write_verified(program, reference: nn.Module, path: str | os.PathLike, stored: dict[str, str], *, batch: int,
                    input_size: int, calibration_images: int,
                    evaluation: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None,
                    fallback: list[torch.Tensor] | None, min_agreement: float, threads: int | None,
                    reference_label: str) -> QuantizeReport:
    """Write the int8 `program` to `path` atomically, after its own runtime agreed with `reference` (the float32
    model, or the QAT graph) on the evaluation batches (or the `fallback` images, unlabelled)."""
    path = Path(path)
    result: dict[str, Any] = {}

    def write(temporary: str) -> None:
        write_pte(program, temporary, stored)
        runner = load_pte(temporary, threads=threads)
        batches = evaluation if evaluation is not None else ((images, None) for images in fallback or [])
        comparison = compare_program(reference, runner, batches)
        if not comparison.images:
            raise UserError(f"no evaluation images to compare the int8 program with the {reference_label} model on")
        if not comparison.agreement >= min_agreement:  # NaN fails too
            hint = ("calibrate on more or more typical images, or lower --min-agreement" if fallback is not None
                    else "lower --min-agreement to keep it anyway")
            raise QuantizationVerificationError(
                f"the int8 program agrees with the {reference_label} model on {comparison.agreement:.2f}% of "
                f"top-1 predictions ({comparison.agree} of {comparison.images} images), below the "
                f"{min_agreement:g}% required; no file written ({hint})")
        result.update(comparison=comparison, bytes=os.path.getsize(temporary), ops=ops_outside_delegate(temporary))

    atomic_write(path, write)
    ops = result["ops"]
    return QuantizeReport(
        path=path, batch=batch, input_size=input_size, calibration_images=calibration_images,
        pte_bytes=result["bytes"], comparison=result["comparison"],
        evaluated_on="validation" if evaluation is not None else "calibration",
        min_agreement=min_agreement, outside_delegate=None if ops is None else ops[0],
        delegates=None if ops is None else ops[1], metadata=stored, reference=reference_label,
    )


# ---------------------------------------------------------------------------------------------------------
# Data: calibration images from a folder, Fashion-MNIST, or a training checkpoint's own run.


@dataclass
class QuantizeData:
    """Calibration and evaluation images for one set of weights, through the weights' eval preprocessing."""

    dataset: str  # what --data named (or the run's data)
    calibration: torch.utils.data.Dataset  # the train split (eval transform), else the validation split
    calibration_split: str  # "train" or "val"
    val: torch.utils.data.Dataset
    num_classes: int
    class_names: list[str]
    preprocessing: Preprocessing
    workers: int


def quantize_data(
    data: str | None, preprocessing: Preprocessing, train_config: dict[str, Any] | None = None, *,
    source: str = "the weights", data_dir: str | None = None, workers: int | None = None,
) -> QuantizeData:
    """The datasets `mobilenetv3 quantize` calibrates and evaluates on.

    `data`: a folder in ImageNet layout (calibration from its train/ images when it has them, else val/),
    "fashion-mnist" (its train split), "synthetic", or None for a training checkpoint's own run (its
    `train_config["data"]`).  Every image goes through `preprocessing.eval_transform()` (no augmentation).
    """
    # the data package imports torchvision: on use only, keeping it off this module's import (`mobilenetv3 bench`)
    from ..data import BUILTIN_DATASETS, DataConfig, build_datasets

    run_data = dict((train_config or {}).get("data") or {})
    if data is None:
        data = run_data.get("dataset")
        if not data:
            raise UserError(f"{source} names no data of its own (a weights file, or a checkpoint whose config has "
                            "no data.dataset): pass --data (a folder in ImageNet layout, or fashion-mnist) for the "
                            "calibration images")
    cfg = DataConfig.for_run(run_data, data, data_dir=data_dir, workers=workers,
                             input_size=preprocessing.input_size, crop_pct=preprocessing.crop_pct)
    has_train = data in BUILTIN_DATASETS or (Path(data).expanduser() / "train").is_dir()
    bundle = build_datasets(cfg, need_train=has_train, preprocessing=preprocessing)
    calibration = bundle.train if bundle.train is not None else bundle.val
    if calibration is not bundle.val and hasattr(calibration, "transform"):
        calibration.transform = bundle.preprocessing.eval_transform()  # eval preprocessing, no augmentation
    return QuantizeData(data, calibration, "train" if calibration is not bundle.val else "val", bundle.val,
                        bundle.num_classes, list(bundle.class_names), bundle.preprocessing, cfg.workers)


def calibration_batches(dataset: torch.utils.data.Dataset, count: int, *, batch_size: int = CALIBRATION_BATCH_SIZE,
                        workers: int = 0, seed: int = 0) -> Iterator[torch.Tensor]:
    """Image batches of `count` images drawn from `dataset` at random (seeded), or all of it when smaller."""
    from ..data import collate_skipping  # torchvision on use only (see quantize_data)

    if count < 1:
        raise UserError(f"--calibration-images must be positive, got {count}")
    total = len(dataset)
    if total == 0:
        raise UserError("the calibration data has no images")
    indices = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    loader = DataLoader(Subset(dataset, sorted(indices)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_skipping)
    for images, _, _ in loader:
        if len(images):
            yield images


def evaluation_batches(dataset: torch.utils.data.Dataset, *, labelled: bool, batch_size: int = 64,
                       workers: int = 0, limit_batches: int | None = None,
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, labels) batches of the validation split in order; labels None when they do not fit the model."""
    from ..data import collate_skipping  # torchvision on use only (see quantize_data)

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_skipping)
    return loader_batches(loader, labelled=labelled, limit_batches=limit_batches)


def loader_batches(loader: Iterable, *, labelled: bool = True, limit_batches: int | None = None,
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, labels or None) of a loader of (images, labels, skipped) batches, the first `limit_batches`."""
    for index, (images, labels, _) in enumerate(loader):
        if limit_batches is not None and index >= limit_batches:
            break
        if len(images):
            yield images, (labels if labelled else None)


def describe_bytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def top1_line(comparison: Comparison, reference: str = "float32") -> str | None:
    """'float32 top-1 91.20%  int8 top-1 90.90%  (-0.30 points)' or None without labels (`reference`: what
    the first number is of, e.g. "fake-quantized" for a QAT model)."""
    if comparison.float_top1 is None:
        return None
    drop = comparison.int8_top1 - comparison.float_top1
    sign = "-" if drop < 0 else "+"
    return (f"{reference} top-1 {comparison.float_top1:.2f}%  int8 top-1 {comparison.int8_top1:.2f}%  "
            f"({sign}{abs(drop):.2f} points)")


