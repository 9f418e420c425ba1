"""Learning-rate range test (Smith 2017; the seed project's lr finder): grow the lr exponentially
for a few hundred steps, watch the smoothed loss, and suggest where to train.

Suggestions: `steepest_lr` is the lr where the smoothed loss falls fastest (per log-lr); `min_loss_lr` is
the lr of the lowest smoothed loss (beyond it training is close to diverging), and a tenth of it is a safe
upper lr.  The suggested range [`suggested_min_lr`, `suggested_max_lr`] spans those two, steepest_lr and
min_loss_lr / 10, whichever is lower first (for cyclic / one-cycle schedules); `steepest_lr` is the
suggestion for a constant or peak lr.  `optim_lr_equivalent` holds the same values as `optim.lr` (`--lr`) at
`optim.lr_base_batch`, which the run scales to its own global batch.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data import build_datasets
from ..errors import UserError
from ..models.registry import get_entry
from .config import TrainConfig
from .distributed import DistEnv, resolve_device
from .loop import AMP_DTYPES, StepSettings, autocast, progress_enabled, to_device
from .optim import build_optimizer
from .run import build_loaders, create_run_model, model_kwargs_for, setup_runtime
from .tasks import get_task, resolve_task

logger = logging.getLogger(__name__)


#: The suggestion keys whose values are learning rates (also given as `optim_lr_equivalent`).
SUGGESTED_LRS = ("steepest_lr", "min_loss_lr", "suggested_min_lr", "suggested_max_lr")


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Steepest descent, lowest loss, and the range between the steepest lr and a tenth of the lowest-loss
    lr (lower end first, whichever it is) of a smoothed loss curve."""
    if len(lrs) < 3:
        raise UserError("the lr range test needs at least 3 steps before the loss diverges")
    log_lrs = [math.log10(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (log_lrs[i + 1] - log_lrs[i - 1]) for i in range(1, len(lrs) - 1)]
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    min_loss_lr = lrs[min(range(len(losses)), key=losses.__getitem__)]
    low, high = sorted([steepest, min_loss_lr / 10])
    return {"steepest_lr": steepest, "min_loss_lr": min_loss_lr, "suggested_min_lr": low, "suggested_max_lr": high}


def lr_range_test(config: TrainConfig, *, start_lr: float = 1e-6, end_lr: float = 1.0, steps: int = 100,
                  smoothing: float = 0.05, diverge_factor: float = 4.0, output: str | Path | None = None,
                  progress: bool | None = None) -> dict[str, Any]:
    """The sweep's suggestions (`suggest`'s keys, `optim_lr_equivalent`, `global_batch`, `steps`) and its
    curve (`lrs`, `losses`, `smoothed`); with `output`, also written to lr_find.json / lr_find.png there
    (`plot`).  `progress`: a tqdm bar over the steps (None: only on a terminal, see `progress_enabled`)."""
    if not 0 < start_lr < end_lr:
        raise UserError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 3:
        raise UserError(f"steps must be >= 3, got {steps}")
    env = DistEnv(device=resolve_device(config.device, 0))
    setup_runtime(config, env)  # threads, CPU memory, determinism, seed (rank 0: config.seed)
    bundle = build_datasets(config.data)
    loader, sampler, _ = build_loaders(config, bundle, env)
    model = create_run_model(config.model, model_kwargs_for(config, bundle)).to(env.device)
    task = get_task(resolve_task(config.task, data_task=bundle.task, model_task=get_entry(config.model.name).task,
                                 dataset=config.data.dataset, model=config.model.name))
    optimizer = build_optimizer(model, config.optim, start_lr)
    settings = StepSettings(device=env.device, amp_dtype=AMP_DTYPES[config.amp],
                            channels_last=config.channels_last, accumulation_steps=1, grad_clip_norm=None,
                            label_smoothing=config.regularization.label_smoothing, num_classes=bundle.num_classes,
                            task=task)
    factor = (end_lr / start_lr) ** (1 / (steps - 1))
    lrs, raw, smoothed = [], [], []
    average, best = 0.0, math.inf
    model.train()
    step, epoch = 0, 0
    with tqdm(total=steps, desc="lr-find", unit="step", disable=not progress_enabled(progress), leave=False,
              dynamic_ncols=True) as bar:  # closed also when a step raises
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
                    loss, _ = task.forward_loss(model, images, targets, settings.label_smoothing)
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
                bar.update(1)
                bar.set_postfix(lr=f"{lr:.3g}", loss=f"{debiased:.4f}", refresh=False)
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
        optim_lr_equivalent={key: result[key] * to_config for key in SUGGESTED_LRS},
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
    # Here, not at the top: the file-only Agg backend must be chosen before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    axes.plot(result["lrs"], result["smoothed"], label="smoothed loss")
    steepest, tenth = result["steepest_lr"], result["min_loss_lr"] / 10
    axes.axvline(steepest, color="green", linestyle="--", label=f"steepest {steepest:.2g}")
    axes.axvline(tenth, color="red", linestyle="--", label=f"min-loss / 10 {tenth:.2g}")
    axes.axvspan(result["suggested_min_lr"], result["suggested_max_lr"], color="green", alpha=0.08,
                 label="suggested range")
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:
        axes.set_ylim(min(finite) * 0.9, min(max(finite), 3 * min(finite)) * 1.1)
    axes.legend()
    axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
