"""Learning-rate range test (Smith 2017; the seed project's lr finder): grow the lr exponentially
for a few hundred steps, watch the smoothed loss, and suggest where to train.

Suggestions: `steepest` is the lr where the smoothed loss falls fastest (per log-lr); `max` is a tenth
of the lr of the lowest loss (beyond it training is close to diverging).  The suggested range is
[steepest, max] for cyclic / one-cycle schedules, and `steepest` as a constant or peak lr.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from .config import TrainConfig
from .distributed import DistEnv, resolve_device
from .loop import autocast, StepSettings, to_device
from .optim import build_optimizer

logger = logging.getLogger(__name__)


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Steepest descent and min-loss/10 of a smoothed loss curve."""
    if len(lrs) < 3:
        raise UserError("the lr range test needs at least 3 steps before the loss diverges")
    log_lrs = [math.log10(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (log_lrs[i + 1] - log_lrs[i - 1]) for i in range(1, len(lrs) - 1)]
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    min_loss_lr = lrs[min(range(len(losses)), key=losses.__getitem__)]
    maximum = min_loss_lr / 10
    return {"steepest": steepest, "min_loss": min_loss_lr, "max": maximum,
            "range": sorted([steepest, maximum]) if maximum != steepest else [steepest, steepest]}


def lr_range_test(config: TrainConfig, *, start_lr: float = 1e-6, end_lr: float = 1.0, steps: int = 100,
                  smoothing: float = 0.05, diverge_factor: float = 4.0, output: str | Path | None = None) -> dict[str, Any]:
    from ..data import build_datasets
    from .run import build_loaders, create_run_model, model_kwargs_for, setup_runtime

    if not 0 < start_lr < end_lr:
        raise UserError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 3:
        raise UserError(f"steps must be >= 3, got {steps}")
    env = DistEnv(device=resolve_device(config.device, 0))
    setup_runtime(config, env)  # threads, CPU memory, determinism, seed (rank 0: config.seed)
    bundle = build_datasets(config.data)
    loader, sampler, _ = build_loaders(config, bundle, env)
    model = create_run_model(config.model, model_kwargs_for(config, bundle)).to(env.device)
    optimizer = build_optimizer(model, config.optim, start_lr)
    settings = StepSettings(device=env.device, amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp),
                            channels_last=config.channels_last, accumulation_steps=1, grad_clip_norm=None,
                            label_smoothing=config.regularization.label_smoothing, num_classes=bundle.num_classes)
    factor = (end_lr / start_lr) ** (1 / (steps - 1))
    lrs, raw, smoothed = [], [], []
    average, best = 0.0, math.inf
    model.train()
    step, epoch = 0, 0
    while step < steps:
        sampler.set_position(epoch)
        for images, targets, _ in loader:
            if step >= steps:
                break
            lr = start_lr * factor**step
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets = to_device(images, targets, settings)
            with autocast(settings):
                loss = F.cross_entropy(model(images).float(), targets, label_smoothing=settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            # Exponential smoothing with bias correction (the first values are not pulled towards 0).
            average = smoothing * value + (1 - smoothing) * average
            debiased = average / (1 - (1 - smoothing) ** (step + 1))
            lrs.append(lr)
            raw.append(value)
            smoothed.append(debiased)
            step += 1
            best = min(best, debiased)
            if not math.isfinite(value) or debiased > diverge_factor * best:
                logger.info("lr-find: the loss diverged at lr %.3g (step %d); stopping", lr, step)
                step = steps
                break
        epoch += 1
    finite = [i for i, value in enumerate(smoothed) if math.isfinite(value)]
    lrs_f, smoothed_f = [lrs[i] for i in finite], [smoothed[i] for i in finite]
    # Ignore the final diverging stretch when picking the steepest descent.
    cut = max(3, min(len(lrs_f), 1 + min(range(len(smoothed_f)), key=smoothed_f.__getitem__) + 1))
    result = suggest(lrs_f[:cut], smoothed_f[:cut])
    global_batch = config.batch_size
    to_config = (config.optim.lr_base_batch / global_batch) if config.optim.lr_base_batch else 1.0
    result.update(
        optim_lr_equivalent={"steepest": result["steepest"] * to_config, "max": result["max"] * to_config},
        global_batch=global_batch, steps=len(lrs), lrs=lrs, losses=raw, smoothed=smoothed,
    )
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "lr_find.json").write_text(json.dumps(result, indent=1))
        plot(result, output / "lr_find.png")
        result["plot"] = str(output / "lr_find.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    axes.plot(result["lrs"], result["smoothed"], label="smoothed loss")
    axes.axvline(result["steepest"], color="green", linestyle="--", label=f"steepest {result['steepest']:.2g}")
    axes.axvline(result["max"], color="red", linestyle="--", label=f"min-loss / 10 {result['max']:.2g}")
    axes.axvspan(*result["range"], color="green", alpha=0.08)
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:
        axes.set_ylim(min(finite) * 0.9, min(max(finite), 3 * min(finite)) * 1.1)
    axes.legend()
    axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
