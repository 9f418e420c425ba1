"""One optimizer step, one training epoch and one evaluation pass, readable top to bottom.

`TrainStep` owns what a step touches (model, optimizer, scheduler, GradScaler, EMA, DropBlock) and
`TrainStep.run_epoch` is the whole optimisation step: mixup/cutmix -> autocast forward -> loss / accumulation
-> (scaled) backward -> unscale + clip -> optimizer step -> schedule / EMA / DropBlock updates.  It keeps no
globals, so a resumed run is the same computation.

Metrics stay on the device (`DeviceSums`): reading a loss or an accuracy back to the host waits for the GPU to
finish, so, as nanoGPT and airbench do, a step only queues work, and the sums are read once per
`SYNC_EVERY_STEPS` steps, before a checkpoint, and at the end of the epoch (`TrainStep.sync`).  A
non-finite loss is caught there, within the epoch it happened in, naming its step.  The criterion is a real
run's throughput on a GPU (`benchmarks/train_speed.py`): no step waits for the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..errors import UserError
from .distributed import DistEnv, all_reduce_sum, group_size, unwrap
from .regularization import DropBlockSchedule, ModelEma
from .tasks import ClassificationTask

logger = logging.getLogger(__name__)


@dataclass
class EpochTotals:
    """Running sums of the epoch in progress (saved in mid-epoch checkpoints, so resumed epochs log exactly)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: int = 0
    skipped: int = 0
    seconds: float = 0.0
    #: fp16: optimizer steps the GradScaler skipped because the scaled gradients overflowed (inf / nan).
    amp_skipped_steps: int = 0


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # micro-batches of epoch `epoch` already done (a mid-epoch resume point)
    step: int = 0  # optimizer steps so far
    totals: EpochTotals = field(default_factory=EpochTotals)
    best_value: float | None = None
    best_epoch: int | None = None


#: Optimizer steps between two reads of the running sums (loss, accuracy, the non-finite check) from the device.
SYNC_EVERY_STEPS = 50

#: `amp` config values -> autocast dtype (None: full precision).
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepSettings:
    """How one optimizer step is made (from the config, fixed for the run)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    channels_last: bool
    accumulation_steps: int
    grad_clip_norm: float | None
    label_smoothing: float
    num_classes: int
    #: the run's task (`tasks.py`): output -> logits, loss, training accuracy, validation metric
    task: ClassificationTask = field(default_factory=ClassificationTask)


def progress_enabled(progress: bool | None = None, stream: Any = None) -> bool:
    """Whether to draw tqdm bars: `progress` when given (--progress / --no-progress), else off when the
    TQDM_DISABLE environment variable is set (to anything but 0 / false / no / off), else only on a terminal:
    a bar's carriage-return frames would fill a log file (the epoch lines say the same, once per epoch)."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def autocast(settings: StepSettings):
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.device.type, dtype=settings.amp_dtype)


def to_device(images: Any, targets: Any, settings: StepSettings):
    """A collated batch on the run's device, as its task lays it out (tensors, or detection's lists)."""
    return settings.task.to_device(images, targets, settings.device, settings.channels_last)


class DeviceSums:
    """The running loss and top-1 sums of an epoch, kept on the device between reads, and the first
    non-finite loss (its step and value).

    The sums continue the host totals in float64, in the same order as adding each micro-batch's
    `float(loss) * batch` on the host would: a read gives the same numbers, bit for bit, whenever it happens.
    """

    def __init__(self, totals: EpochTotals, device: torch.device) -> None:
        def scalar(value: float) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.float64, device=device)

        self.loss_sum, self.correct = scalar(totals.loss_sum), scalar(totals.correct)
        self.bad_step, self.bad_loss = scalar(-1.0), scalar(0.0)  # bad_step -1: every loss so far was finite

    def add(self, loss: torch.Tensor, correct: torch.Tensor, batch: int, step: int) -> None:
        """One micro-batch's mean loss and summed accuracy (`Task.train_correct`) over `batch` samples, at
        optimizer step `step` (1-based); queues device work only."""
        loss = loss.detach().double()
        self.loss_sum += loss * batch
        self.correct += correct
        first_bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, float(step), self.bad_step)
        self.bad_loss = torch.where(first_bad, loss, self.bad_loss)

    def read_into(self, totals: EpochTotals) -> None:
        """Copy the sums into `totals` (one host sync); a non-finite loss so far stops the run."""
        loss_sum, correct, bad_step, bad_loss = torch.stack(
            [self.loss_sum, self.correct, self.bad_step, self.bad_loss]).tolist()
        totals.loss_sum, totals.correct = loss_sum, correct
        if bad_step >= 0:
            raise UserError(f"the training loss became {bad_loss} at step {int(bad_step)}; "
                            "lower the learning rate or enable gradient clipping")


def join_gradient_all_reduce(model: nn.Module, example: torch.Tensor, scaler: torch.amp.GradScaler,
                             settings: StepSettings) -> None:
    """DDP, for an accumulation group's last micro-batch whose every file was unreadable: the other ranks'
    backward all-reduces the gradients now, so take part with a zero loss on a stand-in image shaped like
    `example` (in eval mode: no BatchNorm statistics from it), or they would wait forever.  Without DDP, or
    alone in the group (torchrun with one process), there is nobody to wait: no gradient, no update."""
    if not hasattr(model, "no_sync") or group_size() <= 1:
        return
    model.eval()
    with autocast(settings):
        zero = settings.task.zero_loss(model(torch.zeros_like(example)))
    scaler.scale(zero).backward()
    model.train()


class TrainStep:
    """One optimizer step and everything it updates; `run_epoch` repeats it over a loader.

    `model` is the module to call (DDP / compiled wrapper included); the EMA follows the plain module under
    it.  `input_shape` (C, H, W) lets a DDP rank whose first batches are all unreadable files still take part
    in the gradient all-reduce (`join_gradient_all_reduce`) before it has seen a real batch.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 settings: StepSettings, *, ema: ModelEma | None = None, dropblock: DropBlockSchedule | None = None,
                 env: DistEnv = DistEnv(), input_shape: tuple[int, ...] | None = None,
                 sync_every: int = SYNC_EVERY_STEPS) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.settings, self.ema, self.dropblock, self.env = settings, ema, dropblock, env
        self.input_shape, self.sync_every = input_shape, sync_every
        self.state = TrainState()
        self.sums: DeviceSums | None = None
        self.progress: Any = None  # a tqdm bar, or None
        self.last_scale: float | None = None  # fp16: the loss scale after the last update

    def run_epoch(self, loader: Iterable, state: TrainState, num_batches: int, *, mix: Callable | None = None,
                  on_step_end: Callable[[TrainState], None] | None = None, progress: Any = None) -> EpochTotals:
        """Train on `num_batches` micro-batches of `loader`, starting at `state.batch_in_epoch`.

        The loader already skips the batches a resumed epoch has done (see `data.samplers.ResumableSampler`);
        `state` carries the optimizer step count and the epoch's running sums, and is updated in place.
        `on_step_end(state)` runs after each optimizer step (call `sync` before reading `state.totals` there).
        """
        settings, accumulate = self.settings, self.settings.accumulation_steps
        self.state, self.progress = state, progress
        self.sums = DeviceSums(state.totals, settings.device)
        self.last_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # One image of the last non-empty batch: the shape, dtype and memory format of DDP's stand-in input.
        example = None
        if self.input_shape is not None:
            memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
            example = torch.zeros(1, *self.input_shape, device=settings.device).contiguous(memory_format=memory_format)
        started = time.perf_counter()
        for images, targets, skipped in loader:
            if state.batch_in_epoch >= num_batches:
                break
            state.totals.skipped += skipped
            last_micro_batch = (state.batch_in_epoch + 1) % accumulate == 0
            state.batch_in_epoch += 1
            if len(images) > 0:  # every file of the batch unreadable (collate_skipping): no forward / backward
                example = self.forward_backward(images, targets, mix=mix, last_micro_batch=last_micro_batch)
            elif last_micro_batch and example is not None:
                join_gradient_all_reduce(self.model, example, self.scaler, settings)
            if not last_micro_batch:
                continue
            self.optimizer_step()
            if state.step % self.sync_every == 0 or state.batch_in_epoch >= num_batches:
                self.sync()  # before the clock: the epoch's time includes the device work it queued
            state.totals.seconds += time.perf_counter() - started
            started = time.perf_counter()
            if progress is not None:
                progress.update(1)
            if on_step_end is not None:
                on_step_end(state)
        self.sync()
        return state.totals

    def forward_backward(self, images: Any, targets: Any, *, mix: Callable | None,
                         last_micro_batch: bool) -> torch.Tensor:
        """One micro-batch's forward and backward (its gradient added to the group's); returns one of its
        images, detached (DDP's stand-in shape)."""
        model, settings = self.model, self.settings
        images, targets = to_device(images, targets, settings)
        hard_targets = targets
        if mix is not None and len(images) > 1:
            # v2.MixUp / CutMix blend pairs of images and return soft (one-hot mixed) targets.
            images, targets = mix(images, targets)
            hard_targets = targets.argmax(dim=1)
        # Under DDP, gradients are all-reduced on every backward; skip that for all but the last
        # micro-batch of an accumulation group (no_sync), which is where the averaged gradient is needed.
        no_sync = not last_micro_batch and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(settings):
                # The task's mean loss over the micro-batch (detection: torchvision's SSD loss dict, summed).
                loss, output = settings.task.forward_loss(model, images, targets, settings.label_smoothing)
            # Divided by the group size: the accumulated gradient is the gradient of the mean loss over the
            # whole group, as with one big batch.
            self.scaler.scale(loss / settings.accumulation_steps).backward()
        correct = settings.task.train_correct(output.detach() if output is not None else None, hard_targets)
        self.sums.add(loss, correct, len(images), step=self.state.step + 1)
        self.state.totals.samples += len(images)
        # one image, batched (detection's images are a list)
        return images[:1].detach() if isinstance(images, torch.Tensor) else images[0][None].detach()

    def optimizer_step(self) -> None:
        """Update the weights from the accumulated gradient, then the schedule, the EMA and DropBlock."""
        model, optimizer, scaler, state = self.model, self.optimizer, self.scaler, self.state
        # A group whose every micro-batch was empty has no gradient: no update (GradScaler.step would
        # fail), but the step still counts, so the schedule, EMA and resume points stay where planned.
        if any(p.grad is not None for p in model.parameters()):
            # fp16: gradients are scaled up to avoid underflow; unscale before clipping so the threshold
            # applies to the true gradient norm.  scaler.step skips the update if an inf/nan was found.
            if self.settings.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), self.settings.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            if self.last_scale is not None:
                # fp16 only, one host read per step: update() halves the scale after a skipped step.
                scale = scaler.get_scale()
                if scale < self.last_scale:
                    state.totals.amp_skipped_steps += 1
                self.last_scale = scale
            optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # per-step schedule: the lr of the next step
        state.step += 1
        if self.ema is not None:  # the EMA follows the plain module (not the DDP / compiled wrapper)
            self.ema.maybe_update(unwrap(model), state.step)
        if self.dropblock is not None:  # DropBlock's probability ramps linearly with the step
            self.dropblock.step(state.step)

    def sync(self) -> EpochTotals:
        """Read the device sums into `state.totals` (a host sync; stops the run on a non-finite loss) and
        show them on the progress bar."""
        state = self.state
        if self.sums is not None:
            self.sums.read_into(state.totals)
        totals = state.totals
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{totals.loss_sum / max(totals.samples, 1):.4f}",
                                      lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                                      img_s=f"{totals.samples * self.env.world_size / max(totals.seconds, 1e-9):.0f}",
                                      refresh=False)
        return totals


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    settings: StepSettings,
    *,
    num_batches: int | None = None,
    env: DistEnv = DistEnv(),
    progress_label: str | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """The task's validation metric over the whole set (`settings.task.metric`: classification's mean
    cross-entropy without label smoothing, top-1 / top-5 in percent; segmentation's pixel loss, mIoU, pixel
    accuracy and per-class IoU; detection's loss and COCO mAP), with `samples` and `skipped`.

    A bar labelled `progress_label` is drawn on rank 0 when `progress_enabled(progress)` (by default only
    on a terminal).

    Under DDP each rank sees a disjoint shard (`data.samplers.ShardSampler`) and the sums are all-reduced: every
    sample (and every pixel) is counted exactly once, whatever len(val) % world_size is; `samples` shows it.
    """
    model.eval()
    task = settings.task
    # The metric's sums stay on the device until the end (no host sync per batch).
    metric = task.metric(settings.num_classes, settings.device)
    samples = skipped = 0
    total = len(loader) if num_batches is None else min(num_batches, len(loader))
    show = env.is_main and progress_label is not None and progress_enabled(progress)
    bar = tqdm(total=total, desc=progress_label, disable=not show, leave=False, dynamic_ncols=True)
    for batch_index, (images, targets, skipped_now) in enumerate(loader):
        if batch_index >= total:
            break
        skipped += skipped_now
        if len(images) == 0:
            continue
        images, targets = to_device(images, targets, settings)
        with autocast(settings):
            output = task.evaluate_batch(model, images, targets)
        metric.update(output, targets)
        samples += len(images)
        bar.update(1)
    bar.close()
    samples, skipped = all_reduce_sum([samples, skipped], settings.device)
    if samples == 0:
        raise UserError("validation saw no samples (every file unreadable, or limit_val_batches=0?)")
    return {**metric.compute(int(samples)), "samples": int(samples), "skipped": int(skipped)}
