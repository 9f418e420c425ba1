"""Training checkpoints: plain data only, written atomically, restored exactly.

A checkpoint is a dict of tensors and plain Python values (it loads with `torch.load(weights_only=True)`):

    model_name, model_kwargs      rebuild the network (`mobilenetv3.load_model` reads these)
    model, ema, swa               state dicts (ema / swa are None without EMA / SWA); ema_n_averaged, swa_n_averaged
    optimizer, scheduler, scaler  state dicts
    epoch                         completed epochs; batch_in_epoch: micro-batches done in the next one
    step                          optimizer steps so far; epoch_totals: per rank, the running sums of that epoch
    rng                           per rank: python / numpy / torch / cuda generator states
    sampler                       the seed and position the data order and per-sample augmentation derive from
    config                        the resolved TrainConfig as a dict
    preprocessing, class_names    what eval / predict need
    metrics, best                 the epoch's logged row (epoch-end checkpoints only), the best so far
    qat                           None, or for quantization-aware training the scheme and traced image shape
                                  (then `model` is the fake-quantized graph's state; see train/qat.py)
    versions                      torch / torchvision / mobilenetv3
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import same_dataset
from ..data.decode import FOLDER_PIPELINE_VERSION
from ..errors import UserError
from ..models.mobilenetv3 import ADDED_CONFIG_KEYS
from ..weights.io import atomic_write, load_checkpoint, load_state_with_own_versions
from . import distributed
from .config import flatten, to_dict

logger = logging.getLogger(__name__)

FORMAT = "mobilenetv3-train"
FORMAT_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """This process's generator states, as plain data (numpy's array becomes a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state((
        numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """torch.save to a temp file, fsync, rename: a crash (or SIGKILL) leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run killed mid-write leaves its temp file (".last.pt.XXXX.tmp"); one process writes this folder, so
    # any such file is stale: remove it before it piles up over many preemptions.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load(path: str | Path) -> dict[str, Any]:
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a mobilenetv3 training checkpoint (no format={FORMAT!r}); "
                        "use --pretrained to start from a weights file")
    return payload


def resolve_resume_path(resume: str, output: str | Path) -> Path:
    """--resume (no value: "auto") means OUTPUT/checkpoints/last.pt."""
    path = Path(output) / "checkpoints" / "last.pt" if resume == "auto" else Path(resume)
    if path.is_dir():
        raise UserError(f"cannot resume: {path} is a directory; give a checkpoint file, or --output RUN --resume")
    if not path.is_file():
        hint = f" (no run has saved a checkpoint in {output})" if resume == "auto" else ""
        raise UserError(f"cannot resume: {path} does not exist{hint}")
    return path


#: Config keys a resume may change without breaking the exact-resume promise: where files go and how often
#: they are written, where and how fast the same computation runs, labels, and `epochs` (a longer run
#: stretches the schedule from the resume point on).  Any other change (model, data, input size, batch,
#: batch limits, optimizer, schedule, regularization, precision, layout, seed, determinism) is refused
#: unless the caller allows it (`mobilenetv3 train --allow-config-change`).
RESUME_SAFE_KEYS = frozenset({
    "epochs", "output", "resume", "device", "threads", "keep_freed_memory", "compile",
    "data.workers", "data.data_dir", "data.strict_data", "model.pretrained",
    "checkpoint.every_steps", "checkpoint.keep_last_epochs", "checkpoint.keep_best_epochs",
    "description", "reference_top1", "reference_label", "qat.pte_batch",
})


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, new value) of every key outside RESUME_SAFE_KEYS that differs between a
    checkpoint's config and the config it is resumed with (keys only one side knows are skipped)."""
    old, new = flatten(saved), flatten(current)
    plain = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731

    def same(key: str) -> bool:
        if key == "data.dataset" and isinstance(old[key], str) and isinstance(new[key], str):
            return same_dataset(old[key], new[key])  # ./imgs, imgs/ and imgs are one folder
        return plain(old[key]) == plain(new[key])

    return [(key, old[key], new[key]) for key in new if key in old and key not in RESUME_SAFE_KEYS and not same(key)]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """"optim.lr 0.002 -> 0.01, batch_size 64 -> 32"."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def describe_position(epoch: int, batch_in_epoch: int, step: int, *, epochs: int, batches: int) -> str:
    """A checkpoint's position in 1-based human terms, as the epoch lines count: "epoch 2/10, batch 5/250,
    step 255" (the last batch it includes); an epoch-end checkpoint shows its epoch's last batch."""
    if batch_in_epoch:
        return f"epoch {epoch + 1}/{epochs}, batch {batch_in_epoch}/{batches}, step {step}"
    if epoch == 0:
        return "before the first step"
    return f"epoch {epoch}/{epochs}, batch {batches}/{batches}, step {step}"


def resume_after_restart(resume: str | None, output: str | Path) -> str | None:
    """`resume`, or "auto" when torchrun restarted the worker group (--max-restarts) after a checkpoint.

    torchrun sets TORCHELASTIC_RESTART_COUNT > 0 in a restarted group: it continues from
    OUTPUT/checkpoints/last.pt by itself (or starts over if the first group died before writing one).
    """
    if resume is not None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return resume
    return "auto" if (Path(output) / "checkpoints" / "last.pt").is_file() else None


def check_compatible(payload: dict[str, Any], model_name: str, model_kwargs: dict[str, Any], path: Path) -> None:
    """A checkpoint resumes only into the same network (anything else is a new run, not a resume).  A key the
    checkpoint's version did not have yet stands for the network it built (`ADDED_CONFIG_KEYS`)."""
    saved = {**{k: v for k, v in ADDED_CONFIG_KEYS.items() if k in model_kwargs}, **payload["model_kwargs"]}
    if payload["model_name"] != model_name or saved != dict(model_kwargs):
        theirs = {**saved, "name": payload["model_name"]}
        ours = {**model_kwargs, "name": model_name}
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in diff[:3])
        raise UserError(f"cannot resume from {path}: the model differs ({details})")


def checkpoint_payload(
    *,
    config: Any,
    state: Any,
    world_size: int,
    model_name: str,
    model_kwargs: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    ema: nn.Module | None,
    swa: nn.Module | None,
    preprocessing: dict[str, Any],
    class_names: list[str],
    metrics: dict[str, Any] | None,
    qat: dict[str, Any] | None,
    best_metric: str | None = None,
) -> dict[str, Any]:
    """Everything needed to continue exactly (the inverse of `restore_modules` + `restore_rng`); a collective
    call under DDP (every rank's RNG states and running sums are gathered).

    `config` is the run's TrainConfig, `state` its TrainState (position, running sums, best so far);
    `model_state` the model's state dict (the fake-quantized graph's under QAT); `ema` / `swa` the averages
    (ModelEma / StochasticWeightAverage) or None; `qat` the checkpoint entry of a QAT run, else None;
    `best_metric` the metric `checkpoint.best_metric` resolved to (its "auto": the task's).
    """
    rng = distributed.all_gather_objects(capture_rng())
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_name": model_name, "model_kwargs": model_kwargs, "model": model_state,
        "ema": cpu_state_dict(ema.module) if ema is not None else None,
        "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
        "swa": cpu_state_dict(swa.module) if swa is not None and swa.n_averaged else None,
        "swa_n_averaged": int(swa.n_averaged) if swa is not None else 0,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "step": state.step,
        "epoch_totals": distributed.all_gather_objects(vars(state.totals).copy()),
        "best": {"metric": best_metric or config.checkpoint.best_metric, "value": state.best_value,
                 "epoch": state.best_epoch},
        "rng": rng,
        "sampler": {"seed": config.seed, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                    "batch_size": config.batch_size, "world_size": world_size,
                    "scheme": "DistributedSampler(seed + epoch) order; per-sample augmentation seed "
                              "SeedSequence([seed, epoch, index]), independent of workers",
                    # image folders' training pipeline (data/decode.py): another draws other augmentations
                    "folder_pipeline": FOLDER_PIPELINE_VERSION},
        "config": to_dict(config),
        "preprocessing": preprocessing, "class_names": list(class_names),
        "metrics": metrics,
        "versions": {"torch": str(torch.__version__)},
        "qat": qat,
    }


def restore_modules(
    payload: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    ema: nn.Module | None,
    swa: nn.Module | None = None,
) -> None:
    """Load the checkpoint's states into the run's objects (an optimizer or scaler given as None keeps its
    fresh state: a resume that changed the optimizer or the precision, allowed by the user)."""
    load_state_with_own_versions(model, payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(payload["scaler"])
    if ema is not None:
        if payload.get("ema") is None:
            logger.warning("the checkpoint has no EMA weights: the EMA starts from the current model")
            ema.module.load_state_dict(payload["model"])
        else:
            ema.module.load_state_dict(payload["ema"])
            ema.n_averaged.fill_(int(payload.get("ema_n_averaged", 1)))
    if swa is not None:
        if payload.get("swa") is not None:
            swa.module.load_state_dict(payload["swa"])
            swa.n_averaged.fill_(int(payload["swa_n_averaged"]))
        elif payload["epoch"] > swa.start_epoch:  # a checkpoint of a run without SWA, past the start epoch
            logger.warning("the checkpoint has no SWA average although epoch %d > swa.start_epoch %d: averaging "
                           "starts from the current model", payload["epoch"], swa.start_epoch)


def weights_only_checkpoint(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint that `load_model` and `average` need (for epoch_NNNN.pt files)."""
    keys = ("format", "format_version", "model_name", "model_kwargs", "model", "ema", "epoch", "step",
            "preprocessing", "class_names", "metrics", "config", "versions", "qat")
    return {key: payload[key] for key in keys if key in payload}


def _numbered_epoch_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of folder's epoch_NNNN.pt files in epoch order (epoch_10000.pt comes after epoch_9999.pt)."""
    numbered = []
    for path in folder.glob("epoch_*.pt"):
        number = path.stem.removeprefix("epoch_")
        if number.isdigit():
            numbered.append((int(number), path))
    return sorted(numbered)


def epoch_checkpoints(folder: Path) -> list[Path]:
    """folder's epoch_NNNN.pt files in epoch order (numeric: epoch_10000.pt comes after epoch_9999.pt)."""
    return [path for _, path in _numbered_epoch_checkpoints(folder)]


def best_first(scored: list[tuple[float, Path]], larger_is_better: bool) -> list[Path]:
    """The paths of (score, path) pairs given in epoch order, best score first; on a tie the earlier epoch
    ranks first, as `best.pt` does (sorted() is stable, also with reverse=True).  Pruning with
    checkpoint.keep_best_epochs and `mobilenetv3 average --best` both rank by it, so they pick the same files."""
    return [path for _, path in sorted(scored, key=lambda item: item[0], reverse=larger_is_better)]


def prune_epoch_checkpoints(folder: Path, keep: int, *, keep_best: int = 0, scores: dict[int, float] | None = None,
                            larger_is_better: bool = True) -> None:
    """Delete folder's epoch_NNNN.pt files but those of the last `keep` epochs and of the `keep_best` epochs
    with the best `scores` ({epoch: metric}; see `best_first`)."""
    numbered = _numbered_epoch_checkpoints(folder)
    kept = {path for _, path in numbered[-keep:]} if keep > 0 else set()
    if keep_best > 0:
        scores = scores or {}
        scored = [(scores[epoch], path) for epoch, path in numbered if epoch in scores]
        kept.update(best_first(scored, larger_is_better)[:keep_best])
    for _, stale in numbered:
        if stale not in kept:
            stale.unlink()
