"""One training epoch and one evaluation pass, readable top to bottom.

`train_one_epoch` is the whole optimisation step: mixup/cutmix -> autocast forward -> loss / accumulation
-> (scaled) backward -> unscale + clip -> optimizer step -> schedule / EMA / DropBlock updates.  Everything
the loop needs is passed in; it keeps no globals, so a resumed run is the same computation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import UserError
from .distributed import DistEnv, all_reduce_sum, group_size, unwrap

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


def to_device(images: torch.Tensor, targets: torch.Tensor, settings: StepSettings):
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    non_blocking = settings.device.type == "cuda"
    images = images.to(settings.device, non_blocking=non_blocking, memory_format=memory_format)
    return images, targets.to(settings.device, non_blocking=non_blocking)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[float]:
    """Number of samples whose target is in the top-k logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    predicted = logits.topk(maxk, dim=1).indices
    hits = predicted.eq(targets[:, None])
    return [float(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    settings: StepSettings,
    state: TrainState,
    num_batches: int,
    mix: Callable | None = None,
    ema: Any = None,
    dropblock: Any = None,
    on_step_end: Callable[[TrainState], None] | None = None,
    env: DistEnv = DistEnv(),
    progress: Any = None,
    input_shape: tuple[int, ...] | None = None,
) -> EpochTotals:
    """Train on `num_batches` micro-batches of `loader`, starting at `state.batch_in_epoch`.

    The loader already skips the batches a resumed epoch has done (see `ResumableSampler`); `state`
    carries the optimizer step count and the epoch's running sums, and is updated in place.
    `input_shape` (C, H, W) lets a DDP rank whose first batches are all unreadable files still take part
    in the gradient all-reduce (with a zero loss on a stand-in image) before it has seen a real batch.
    """
    model.train()
    totals = state.totals
    accumulate = settings.accumulation_steps
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    # One image of the last non-empty batch: the shape, dtype and memory format of DDP's stand-in input.
    example: torch.Tensor | None = None
    if input_shape is not None:
        example = to_device(torch.zeros(1, *input_shape), torch.zeros(1), settings)[0]
    for images, targets, skipped in loader:
        if state.batch_in_epoch >= num_batches:
            break
        totals.skipped += skipped
        # Under DDP, gradients are all-reduced on every backward; skip that for all but the last
        # micro-batch of an accumulation group (no_sync), which is where the averaged gradient is needed.
        last_micro_batch = (state.batch_in_epoch + 1) % accumulate == 0
        state.batch_in_epoch += 1
        if images.shape[0] > 0:  # every file of the batch unreadable (collate_skipping): no forward / backward
            images, targets = to_device(images, targets, settings)
            hard_targets = targets
            if mix is not None and len(images) > 1:
                # v2.MixUp / CutMix blend pairs of images and return soft (one-hot mixed) targets.
                images, targets = mix(images, targets)
                hard_targets = targets.argmax(dim=1)
            sync = contextlib.nullcontext() if last_micro_batch or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(settings):
                    logits = model(images)
                    # Mean over the micro-batch, divided by the group size: the accumulated gradient is the
                    # gradient of the mean loss over the whole group, as with one big batch.
                    loss = F.cross_entropy(logits.float(), targets, label_smoothing=settings.label_smoothing)
                scaler.scale(loss / accumulate).backward()
            totals.loss_sum += float(loss.detach()) * images.shape[0]
            totals.correct += topk_correct(logits.detach(), hard_targets, (1,))[0]
            totals.samples += images.shape[0]
            if not torch.isfinite(loss.detach()):
                raise UserError(f"the training loss became {float(loss.detach())} at step {state.step + 1}; "
                                "lower the learning rate or enable gradient clipping")
            example = images[:1].detach()
        elif last_micro_batch and example is not None and hasattr(model, "no_sync") and group_size() > 1:
            # DDP: the other ranks' backward all-reduces the gradients now; take part with a zero loss (eval
            # mode: no BatchNorm statistics from the stand-in image), or they would wait forever.  Alone
            # (torchrun with one process) there is nobody to wait: no gradient, no update, as without DDP.
            model.eval()
            with autocast(settings):
                zero = model(torch.zeros_like(example)).float().sum() * 0.0
            scaler.scale(zero).backward()
            model.train()
        if not last_micro_batch:
            continue

        # A group whose every micro-batch was empty has no gradient: no update (GradScaler.step would
        # fail), but the step still counts, so the schedule, EMA and resume points stay where planned.
        if any(p.grad is not None for p in model.parameters()):
            # fp16: gradients are scaled up to avoid underflow; unscale before clipping so the threshold
            # applies to the true gradient norm.  scaler.step skips the update if an inf/nan was found.
            if settings.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip_norm)
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            if scale_before is not None and scaler.get_scale() < scale_before:  # update() halves it after a skip
                totals.amp_skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # per-step schedule: the lr of the next step
        state.step += 1
        if ema is not None:  # the EMA follows the plain module (not the DDP / compiled wrapper)
            ema.maybe_update(unwrap(model), state.step)
        if dropblock is not None:  # DropBlock's probability ramps linearly with the step
            dropblock.step(state.step)
        totals.seconds += time.perf_counter() - started
        started = time.perf_counter()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{totals.loss_sum / max(totals.samples, 1):.4f}",
                                 lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                                 img_s=f"{totals.samples * env.world_size / max(totals.seconds, 1e-9):.0f}",
                                 refresh=False)
        if on_step_end is not None:
            on_step_end(state)
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
    """Top-1 / top-5 (percent) and mean cross-entropy (no label smoothing) over the whole set.

    A bar labelled `progress_label` is drawn on rank 0 when `progress_enabled(progress)` (by default only
    on a terminal).

    Under DDP each rank sees a disjoint shard (`ShardSampler`) and the sums are all-reduced: every
    sample is counted exactly once, whatever len(val) % world_size is; `samples` shows it.
    """
    from tqdm import tqdm

    model.eval()
    loss_sum = correct1 = correct5 = samples = skipped = 0.0
    total = len(loader) if num_batches is None else min(num_batches, len(loader))
    show = env.is_main and progress_label is not None and progress_enabled(progress)
    bar = tqdm(total=total, desc=progress_label, disable=not show, leave=False, dynamic_ncols=True)
    for batch_index, (images, targets, skipped_now) in enumerate(loader):
        if batch_index >= total:
            break
        skipped += skipped_now
        if images.shape[0] == 0:
            continue
        images, targets = to_device(images, targets, settings)
        with autocast(settings):
            logits = model(images)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        top1, top5 = topk_correct(logits, targets, (1, 5))
        correct1 += top1
        correct5 += top5
        samples += images.shape[0]
        bar.update(1)
    bar.close()
    loss_sum, correct1, correct5, samples, skipped = all_reduce_sum(
        [loss_sum, correct1, correct5, samples, skipped], settings.device
    )
    if samples == 0:
        raise UserError("validation saw no samples (every file unreadable, or limit_val_batches=0?)")
    return {
        "loss": loss_sum / samples,
        "top1": 100.0 * correct1 / samples,
        "top5": 100.0 * correct5 / samples,
        "samples": int(samples),
        "skipped": int(skipped),
    }
