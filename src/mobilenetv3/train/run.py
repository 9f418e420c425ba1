"""`run(config) -> summary`: data -> model -> optimizer -> resume -> epochs of train / validate / record.

This is the library entry point of `mobilenetv3 train`; it never reads argv.  Under torchrun every
process calls it; only rank 0 writes files and logs.
"""

from __future__ import annotations

import inspect
import logging
import os
import platform
import random
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..allocator import keep_freed_memory
from ..data import build_datasets, collate_skipping
from ..data.decode import DeviceBatches
from ..data.samplers import ResumableSampler, SeededSamples, ShardSampler
from ..deploy.quantize import describe_bytes, loader_batches, top1_line
from ..errors import UserError, first_line
from ..factory import create_model
from ..files import is_url, missing_folders, remove_empty_folders
from ..models.heads.lraspp import LRASPP
from ..models.mobilenetv3 import MobileNetV3
from ..models.registry import get_entry
from ..weights import io as weights_io
from ..weights.io import build_model, model_description, save_model
from ..weights.pretrained import fetch
from . import checkpoint as ckpt
from . import distributed, qat
from .config import BEST_METRICS, TrainConfig, dump_yaml, replace_config, to_dict
from .distributed import DistEnv
from .loop import AMP_DTYPES, EpochTotals, StepSettings, TrainState, TrainStep, evaluate, progress_enabled
from .metrics import MetricsWriter
from .optim import Schedule, build_optimizer, build_scheduler, scaled_lr
from .regularization import DropBlockSchedule, ModelEma, StochasticWeightAverage, build_mix
from .tasks import get_task, resolve_task

logger = logging.getLogger(__name__)


def provenance() -> dict[str, Any]:
    """Versions and git commit of the code that made a run (written into config.yaml)."""
    source = Path(__file__).resolve().parent
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit += "-dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "mobilenetv3": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
        "python": platform.python_version(), "git_commit": commit, "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_runtime(config: TrainConfig, env: DistEnv) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.keep_freed_memory and env.device.type == "cpu":
        keep_freed_memory()  # no page faults on every step (see mobilenetv3/allocator.py)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA kernels have no deterministic version; on CPU every op used here has one.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # Each rank draws its own dropout / mixup randomness; model init is broadcast from rank 0 by DDP.
    seed_everything(config.seed + env.rank)


def model_kwargs_for(config: TrainConfig, bundle) -> dict[str, Any]:
    """Model kwargs: what the data implies (e.g. in_chans=1), then the config's explicit values."""
    cfg = config.model
    if cfg.num_classes is not None and cfg.num_classes != bundle.num_classes:
        raise UserError(
            f"model.num_classes={cfg.num_classes} but the dataset {config.data.dataset!r} has "
            f"{bundle.num_classes} classes"
        )
    if cfg.in_chans is not None and cfg.in_chans != bundle.in_chans:
        raise UserError(f"model.in_chans={cfg.in_chans} but the dataset has {bundle.in_chans}-channel images")
    if cfg.output_stride is not None and get_entry(cfg.name).task == "detection":
        raise UserError(f"model.output_stride is not an option of the detector {cfg.name} (SSDLite taps strides "
                        "16 and 32 and adds its own extra layers)")
    if cfg.head is not None and get_entry(cfg.name).task != "segmentation":
        raise UserError(f"model.head={cfg.head} is an option of the segmentation models, not of {cfg.name}")
    kwargs = dict(bundle.model_defaults)
    for key in ("in_chans", "stem_stride", "output_stride", "width_mult", "bn_eps", "bn_momentum", "head"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    kwargs.update(num_classes=bundle.num_classes, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate,
                  zero_init_last=cfg.zero_init_last)
    return kwargs


#: Data keys that can change the network (its class or channel count), like the `model.` keys: a resume that
#: changes one is refused by `checkpoint.check_compatible`, naming the model difference, when it does.
MODEL_SHAPING_DATA_KEYS = ("data.dataset", "data.synthetic_classes")


#: Constructor kwargs a run takes from its data and its recipe, never from a pretrained file's layout.
RUN_MODEL_KWARGS = (
    "num_classes", "in_chans", "stem_stride", "output_stride", "drop_rate", "drop_path_rate", "bn_momentum",
    "zero_init_last",
)


def create_run_model(model_config, model_kwargs: dict[str, Any]) -> nn.Module:
    """The configured network; with `model.pretrained`, in the weights' own layout and with their tensors.

    The file must fit its own network and be the configured one (same name, or the generic builder of its
    architecture).  Its layout kwargs (padding, bn_eps, ...) are applied through `create_model(pretrained=...)`
    (`weights.pretrained.pretrained_kwargs` / `load_pretrained`), which replaces a classifier of another class
    count; the data-dependent and training-time kwargs (`RUN_MODEL_KWARGS`) are this run's own: the data's or
    the config's, else the constructor's defaults.
    """
    if not model_config.pretrained:
        return create_model(model_config.name, **model_kwargs)
    location = str(model_config.pretrained)
    if not is_url(location):  # an absolute path is always read as a file, whatever its suffix
        location = os.path.abspath(os.path.expanduser(location))
    weights = weights_io.read_weights(fetch(location))
    if weights.extra.get("qat"):
        raise UserError(f"{model_config.pretrained} is a quantization-aware training checkpoint, not float weights: "
                        f"continue its run with --resume {model_config.pretrained}, or start from float weights")
    build_model(weights)  # the file must first be what it says it is: its tensors all fit its own network
    found, wanted = weights.model_name, model_config.name
    entries = get_entry(found), get_entry(wanted)
    arches = entries[0].arch, entries[1].arch
    prefix = {"": "", "lraspp": "lraspp_", "ssdlite": "ssdlite_"}[entries[1].head]
    generic = {f"{prefix}mobilenetv3_{arch}" for arch in arches}
    if (arches[0] != arches[1] or entries[0].head != entries[1].head
            or (found != wanted and not {found, wanted} & generic)):
        raise UserError(f"{model_config.pretrained} holds a {found} ({arches[0]}), but the config trains a "
                        f"{wanted} ({arches[1]}); set model.name={found} (--model {found}) to start from it")
    # the constructor's defaults: LR-ASPP's own (num_classes, output_stride 16, ...), then its backbone's
    defaults = dict(inspect.signature(MobileNetV3).parameters)
    if entries[1].head == "lraspp":
        defaults.update(inspect.signature(LRASPP).parameters)
    if entries[1].head == "ssdlite":  # its own defaults (91 classes); the backbone's output stride is fixed
        from ..models.heads.ssdlite import SSDLite

        defaults.update(inspect.signature(SSDLite).parameters)
        defaults.pop("output_stride")
    kwargs = {key: defaults[key].default for key in RUN_MODEL_KWARGS if key in defaults}
    kwargs.update(model_kwargs)
    return create_model(model_config.name, pretrained=location, loaded_weights=weights, **kwargs)


def build_loaders(config: TrainConfig, bundle, env: DistEnv) -> tuple[Iterable, ResumableSampler, DataLoader]:
    """(train batches, their sampler, val loader).  Train batches are (images, targets, skipped) as the model takes
    them: a bundle with `finish_train_batch` (image folders: uint8 pixels, normalised on the device) gets its
    batches through `DeviceBatches`, already on `env.device`."""
    if config.data.decode == "gpu" and bundle.finish_train_batch is None:
        raise UserError(f"data.decode=gpu decodes an image folder's JPEGs; {config.data.dataset!r} has none to "
                        "decode: drop it")
    if config.data.decode == "gpu" and env.device.type != "cuda":
        raise UserError(f"data.decode=gpu decodes JPEGs on a CUDA device, and this run's device is {env.device}: "
                        "use data.decode=cpu (the default)")
    common = dict(
        num_workers=config.data.workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=config.data.workers > 0,
        collate_fn=collate_skipping,
    )
    train_sampler = ResumableSampler(bundle.train, seed=config.seed, num_replicas=env.world_size, rank=env.rank)
    # A private generator: creating a loader iterator must not consume the global torch RNG, or a
    # resumed run's dropout / mixup draws would shift relative to an uninterrupted one.
    train_loader = DataLoader(SeededSamples(bundle.train), batch_size=config.batch_size, sampler=train_sampler,
                              drop_last=True, generator=torch.Generator().manual_seed(config.seed), **common)
    if bundle.finish_train_batch is not None:
        train_loader = DeviceBatches(train_loader, bundle.finish_train_batch, env.device)
    val_sampler = ShardSampler(len(bundle.val), num_replicas=env.world_size, rank=env.rank)
    val_loader = DataLoader(bundle.val, batch_size=bundle.val_batch_size or config.batch_size, sampler=val_sampler,
                            generator=torch.Generator().manual_seed(config.seed), **common)
    return train_loader, train_sampler, val_loader


def run(config: TrainConfig, *, progress: bool | None = None, allow_config_change: bool = False) -> dict[str, Any]:
    """Train as `config` says; returns a summary dict (also logged as the final line).

    `progress`: tqdm bars (True), one line per epoch only (False), or bars only on a terminal unless
    TQDM_DISABLE is set (None; see `loop.progress_enabled`).  `allow_config_change`: resume even though the
    config differs from the checkpoint's in keys that break an exact resume (see `checkpoint.RESUME_SAFE_KEYS`).
    A run that fails or is interrupted before its first checkpoint leaves no folder it created behind.
    """
    env = distributed.init(config.device)
    resume = ckpt.resume_after_restart(config.resume, config.output)
    if resume != config.resume:
        logger.info("torchrun restart %s: resuming from %s/checkpoints/last.pt",
                    os.environ.get("TORCHELASTIC_RESTART_COUNT"), config.output)
        config = replace_config(config, resume=resume)
    created = missing_folders(config.output) if env.is_main else []
    trainer = None
    try:
        trainer = Trainer(config, env, progress=progress, allow_config_change=allow_config_change)
        return trainer.fit()
    except BaseException as error:
        removed = _remove_unsaved_run(Path(config.output), created)
        if isinstance(error, KeyboardInterrupt) and env.is_main:
            logger.warning("%s", interrupted_message(config, env, trainer, removed))
        raise
    finally:
        distributed.shutdown()


def _remove_unsaved_run(output: Path, created: list[Path]) -> bool:
    """After a failure: remove the folders this run created if no checkpoint made it in (a failed command
    writes nothing: no empty runs/NAME to trip over); True when it removed `output`."""
    if not created or not output.is_dir():
        return False
    checkpoints = output / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return False
    shutil.rmtree(output, ignore_errors=True)
    remove_empty_folders(created[1:])
    return not output.exists()


def resume_command(output: str | Path, env: DistEnv, checkpoint: Path | None = None) -> str:
    """The command line that continues a run (`checkpoint`: a file other than OUTPUT/checkpoints/last.pt)."""
    resume = "--resume" if checkpoint is None else f"--resume {shlex.quote(str(checkpoint))}"
    command = f"train --output {shlex.quote(str(output))} {resume}"
    if not env.process_group:
        return f"mobilenetv3 {command}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    nodes = "" if per_node == env.world_size else " (on every node, with this job's rendezvous options)"
    return f"torchrun --nproc_per_node={per_node} -m mobilenetv3 {command}{nodes}"


def interrupted_message(config: TrainConfig, env: DistEnv, trainer: "Trainer | None", removed: bool) -> str:
    """What Ctrl-C leaves: the checkpoint that holds the run (epoch, batch and step, 1-based) and the command
    that resumes from it, or that nothing was saved."""
    saved = trainer.saved if trainer is not None else None
    default = Path(config.output) / "checkpoints" / "last.pt"
    if saved is None and config.resume and trainer is None:  # interrupted while starting a resume
        path = default if config.resume == "auto" else Path(config.resume)
        return (f"interrupted before training resumed; {path} is unchanged; resume with: "
                f"{resume_command(config.output, env, None if path == default else path)}")
    if saved is None:
        where = f"; removed {config.output}" if removed else ""
        return (f"interrupted before the first checkpoint: nothing was saved{where} (a checkpoint is written "
                "at the end of each epoch, and every N steps with --checkpoint-every-steps N)")
    path, position = saved
    return (f"interrupted: {path} holds {position}; resume with: "
            f"{resume_command(config.output, env, None if path == default else path)}")


class Trainer:
    """Holds what one run builds; `fit` is the epoch loop.  Built in the order data -> model -> optimizer ->
    resume -> wrappers (DDP, compile) -> run folder."""

    def __init__(self, config: TrainConfig, env: DistEnv, *, progress: bool | None = None,
                 allow_config_change: bool = False) -> None:
        self.config, self.env = config, env
        self.output = Path(config.output)
        self.log = logger.info if env.is_main else (lambda *args, **kwargs: None)
        self.progress = env.is_main and progress_enabled(progress)
        self.allow_config_change = allow_config_change
        #: (path, "epoch E/N, batch B/M, step S") of the newest checkpoint that holds this run, for Ctrl-C.
        self.saved: tuple[Path, str] | None = None
        # A --resume without its checkpoint, or with settings that break an exact resume, fails first, before
        # any data is read.  The run folder is made once everything that can fail on the user's input has
        # passed (data, model, resume): a misspelt --data or a --resume without a run leaves no empty folder.
        resume_path = self._read_resume()
        if config.qat.enabled:
            qat.require_extra()
        setup_runtime(config, env)
        model_kwargs = self._build_data()
        self._build_model(model_kwargs)
        self._build_optimizer()
        self.state = TrainState()
        if resume_path is not None:
            self._resume(resume_path)
        self._wrap_model()
        self._open_run_folder()

    def _read_resume(self) -> Path | None:
        """The checkpoint to resume from (read into `resume_payload`), refusing changed settings that break an
        exact resume (changes that alter the network are left to `check_compatible`, which names them)."""
        config = self.config
        resume_path = ckpt.resolve_resume_path(config.resume, self.output) if config.resume else None
        self.resume_payload = ckpt.load(resume_path) if resume_path is not None else None
        #: (key, checkpoint value, new value) of the settings this resume changes; refused unless allowed
        if self.resume_payload is not None:
            qat.refuse_mixed_resume(self.resume_payload, config.qat.enabled, resume_path)
        self.resume_changes = [] if self.resume_payload is None else ckpt.config_changes(
            self.resume_payload.get("config") or {}, to_dict(config))
        if not any(key.startswith("model.") or key in MODEL_SHAPING_DATA_KEYS for key, _, _ in self.resume_changes):
            self._refuse_config_changes(resume_path, self.resume_changes)
        return resume_path

    def _build_data(self) -> dict[str, Any]:
        """Datasets, loaders and the epoch's batch and step counts; returns the model kwargs the data implies."""
        config, env = self.config, self.env
        with distributed.rank_zero_first(env):
            self.bundle = bundle = build_datasets(config.data)
        synthetic = " (synthetic: random tensors, not real images)" if config.data.dataset == "synthetic" else ""
        self.log("data: %s%s", bundle.describe(), synthetic)
        model_kwargs = model_kwargs_for(config, bundle)  # class / channel mismatches fail before any work
        task_name = resolve_task(config.task, data_task=bundle.task, model_task=get_entry(config.model.name).task,
                                 dataset=config.data.dataset, model=config.model.name)
        #: what the task contributes (train/tasks.py): logits, loss, training accuracy, validation metric, columns
        self.task = get_task(task_name)
        self.task.check_config(config)
        best = config.checkpoint.best_metric
        #: `checkpoint.best_metric`, its "auto" resolved to the task's metric
        self.best_metric = self.task.best_metric if best == "auto" else best
        if self.best_metric.split("_val_")[-1].removeprefix("val_") not in self.task.columns:
            raise UserError(f"checkpoint.best_metric={best} is not a {task_name} metric; use "
                            f"{self.task.best_metric} (or auto)")
        self.train_loader, self.train_sampler, self.val_loader = build_loaders(config, bundle, env)
        size = bundle.preprocessing.input_size  # train crops are square, input_size on a side
        self.input_shape = (bundle.in_chans, size, size)
        accumulate = config.optim.accumulation_steps
        batches = len(self.train_loader)
        if config.limit_train_batches is not None:
            batches = min(batches, config.limit_train_batches)
        self.batches_per_epoch = batches // accumulate * accumulate
        self.steps_per_epoch = self.batches_per_epoch // accumulate
        if self.steps_per_epoch < 1:
            raise UserError(
                f"the training set ({len(bundle.train)} samples over {env.world_size} process(es)) gives no full "
                f"step at batch_size={config.batch_size} x accumulation_steps={accumulate}"
            )
        return model_kwargs

    def _build_model(self, model_kwargs: dict[str, Any]) -> None:
        """The network (+ pretrained weights), its QAT graph or memory layout, EMA / SWA copies, DropBlock hooks
        (the copies are made first so they do not inherit the hooks) and mixup / cutmix."""
        config, env = self.config, self.env
        model = create_run_model(config.model, model_kwargs)
        self.model_name, self.model_kwargs = model_description(model)
        model.to(env.device)
        #: the float network; under QAT the run trains its fake-quantized graph instead (train/qat.py)
        self.network = model
        if config.qat.enabled:
            # Its parameters stay contiguous even with channels_last inputs: the gradients that come back
            # through the weights' fake quantization are contiguous, and DDP's buckets must match them.
            model = qat.prepare(model, self.input_shape)
            self.log("quantization-aware training: the fake-quantized int8 graph of %s (PT2E, XNNPACK scheme)",
                     self.model_name)
        elif config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = ModelEma(model, config.ema) if config.ema.enabled else None
        self.swa = StochasticWeightAverage(model, config.swa, config.epochs) if config.swa.enabled else None
        total_steps = self.steps_per_epoch * config.epochs
        self.dropblock = (DropBlockSchedule(model, config.regularization, total_steps)
                          if config.regularization.dropblock_prob > 0 else None)
        self.mix = build_mix(config.regularization, self.bundle.num_classes)

    def _build_optimizer(self) -> None:
        """Optimizer, per-step schedule, GradScaler and step settings; the lr scales with the global batch."""
        config, env, model = self.config, self.env, self.model
        accumulate = config.optim.accumulation_steps
        self.global_batch = config.batch_size * env.world_size * accumulate
        self.base_lr = scaled_lr(config.optim, self.global_batch)
        self.optimizer = build_optimizer(model, config.optim, self.base_lr)
        self.schedule = Schedule(config.schedule, self.base_lr, self.steps_per_epoch, config.epochs, config.swa)
        self.scheduler = build_scheduler(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=config.amp == "fp16")
        self.settings = StepSettings(
            device=env.device, amp_dtype=AMP_DTYPES[config.amp], channels_last=config.channels_last,
            accumulation_steps=accumulate, grad_clip_norm=config.optim.grad_clip_norm,
            label_smoothing=config.regularization.label_smoothing, num_classes=self.bundle.num_classes,
            task=self.task,
        )
        self.log("model %s (%s params), global batch %d, lr %.4g (%s at %s images), %d steps/epoch",
                 self.model_name, f"{sum(p.numel() for p in model.parameters()):,}", self.global_batch,
                 self.base_lr, config.optim.lr, config.optim.lr_base_batch or "any", self.steps_per_epoch)

    def _wrap_model(self) -> None:
        """DDP / SyncBN / compile wrap last: checkpoints and EMA always use the plain module."""
        config, env = self.config, self.env
        self.train_model = distributed.wrap_model(self.model, env, config.sync_bn)
        if config.sync_bn and env.distributed:
            self.model = distributed.unwrap(self.train_model)
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.train_step = TrainStep(self.train_model, self.optimizer, self.scheduler, self.scaler, self.settings,
                                    ema=self.ema, dropblock=self.dropblock, env=env, input_shape=self.input_shape)

    def _open_run_folder(self) -> None:
        """The run folder, its metrics records (cut back to the resumed epoch) and config.yaml (rank 0)."""
        config, env = self.config, self.env
        if env.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsWriter(self.output, enabled=env.is_main, reference_top1=config.reference_top1,
                                     reference_label=config.reference_label,
                                     title=f"{self.model_name} on {config.data.dataset}")
        if config.resume:
            self.metrics.truncate_after(self.state.epoch)
        if env.is_main:
            config_text = dump_yaml(config, {**provenance(), "world_size": env.world_size})
            (self.output / "config.yaml").write_text(config_text)

    # ----------------------------------------------------------------------------------------------------

    def _refuse_config_changes(self, path: Path, changes: list[tuple[str, Any, Any]]) -> None:
        if changes and not self.allow_config_change:
            raise UserError(
                f"cannot resume {path} exactly: the config differs from the checkpoint's in "
                f"{ckpt.describe_changes(changes)}; drop those settings, or pass --allow-config-change to "
                "continue with the new values (config.yaml is then rewritten with them)"
            )

    def _resume(self, path: Path) -> None:
        payload, self.resume_payload = self.resume_payload, None  # read once, in __init__
        ckpt.check_compatible(payload, self.model_name, self.model_kwargs, path)
        changes = self.resume_changes  # the network's own changes were left to check_compatible, just above
        self._refuse_config_changes(path, changes)
        if changes and self.env.is_main:
            logger.warning("resuming %s with a changed config (not an exact resume): %s", path,
                           ckpt.describe_changes(changes))
        sampler = payload["sampler"]
        written_by = sampler.get("folder_pipeline")
        if self.bundle.finish_train_batch is not None and written_by != ckpt.FOLDER_PIPELINE_VERSION \
                and self.env.is_main:
            logger.warning("%s was written by an earlier image-folder pipeline (%s): the resumed epochs draw other "
                           "crops and augmentations than an uninterrupted run would (not an exact resume)", path,
                           "the PIL one" if written_by is None else f"version {written_by}")
        if payload["batch_in_epoch"] and (sampler["world_size"] != self.env.world_size
                                          or sampler["batch_size"] != self.config.batch_size):
            raise UserError(
                f"cannot resume {path} mid-epoch with a different world size or batch size "
                f"(checkpoint: {sampler['world_size']} x {sampler['batch_size']}, now: "
                f"{self.env.world_size} x {self.config.batch_size}); resume from an epoch-end checkpoint"
            )
        # The optimizer's and scheduler's saved state carries the old hyperparameters (lr, weight decay, ...):
        # with an allowed change the new config's values replace them; another optimizer or precision starts
        # its state afresh (the saved one does not fit it).
        changed = {key for key, _, _ in changes}
        fresh_groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        fresh_base_lrs = list(self.scheduler.base_lrs)
        ckpt.restore_modules(payload, model=self.model,
                             optimizer=None if "optim.name" in changed else self.optimizer,
                             scheduler=self.scheduler, scaler=None if "amp" in changed else self.scaler,
                             ema=self.ema, swa=self.swa)
        if changes:
            for group, fresh, base in zip(self.optimizer.param_groups, fresh_groups, fresh_base_lrs):
                group.update(fresh)
                group.update(initial_lr=base, lr=base * self.schedule(self.scheduler.last_epoch))
            self.scheduler.base_lrs = fresh_base_lrs
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        totals = payload["epoch_totals"]  # one per rank: each rank resumes its own running sums
        if isinstance(totals, list):
            totals = totals[self.env.rank] if len(totals) == self.env.world_size else totals[0]
        self.state = TrainState(
            epoch=payload["epoch"], batch_in_epoch=payload["batch_in_epoch"], step=payload["step"],
            totals=EpochTotals(**totals),
            best_value=payload["best"]["value"], best_epoch=payload["best"]["epoch"],
        )
        if self.dropblock is not None:
            self.dropblock.step(self.state.step)
        per_rank = payload["rng"]
        ckpt.restore_rng(per_rank[self.env.rank] if len(per_rank) == self.env.world_size else per_rank[0])
        state, config = self.state, self.config
        position = ckpt.describe_position(state.epoch, state.batch_in_epoch, state.step, epochs=config.epochs,
                                          batches=self.batches_per_epoch)
        self.saved = (path, position)
        if state.epoch >= config.epochs:
            after = f"all {config.epochs} epochs are done; raise --epochs to train more"
        elif state.batch_in_epoch:
            after = f"continuing with batch {state.batch_in_epoch + 1} of epoch {state.epoch + 1}"
        else:
            after = f"continuing with epoch {state.epoch + 1}"
        self.log("resumed from %s (saved at %s): %s", path, position, after)

    def checkpoint_payload(self, metrics: dict[str, Any] | None) -> dict[str, Any]:
        """This run's `checkpoint.checkpoint_payload`; a collective call under DDP."""
        config, bundle = self.config, self.bundle
        return ckpt.checkpoint_payload(
            config=config, state=self.state, world_size=self.env.world_size,
            model_name=self.model_name, model_kwargs=self.model_kwargs,
            model_state=qat.state_dict(self.model) if config.qat.enabled else ckpt.cpu_state_dict(self.model),
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, ema=self.ema, swa=self.swa,
            preprocessing=bundle.preprocessing.to_dict(), class_names=list(bundle.class_names), metrics=metrics,
            qat=qat.checkpoint_entry(self.input_shape) if config.qat.enabled else None, best_metric=self.best_metric)

    def _save_mid_epoch(self, state: TrainState) -> None:
        every = self.config.checkpoint.every_steps
        if every and state.step % every == 0 and state.batch_in_epoch < self.batches_per_epoch:
            self.train_step.sync()  # the running sums go into the checkpoint; a non-finite loss stops before it
            payload = self.checkpoint_payload(None)
            if self.env.is_main:
                self._mark_saved(ckpt.save(self.output / "checkpoints" / "last.pt", payload))

    def _mark_saved(self, path: Path) -> None:
        state = self.state
        self.saved = (path, ckpt.describe_position(state.epoch, state.batch_in_epoch, state.step,
                                                   epochs=self.config.epochs, batches=self.batches_per_epoch))

    def _is_better(self, value: float) -> bool:
        if self.state.best_value is None:
            return True
        larger_is_better = BEST_METRICS[self.best_metric]
        return value > self.state.best_value if larger_is_better else value < self.state.best_value

    def _write_int8_program(self) -> str | None:
        """QAT: the final graph as checkpoints/int8.pte (rank 0), verified against the graph (train/qat.py).  The
        training is saved by then: a program that fails is a warning naming the command that retries it."""
        folder = self.output / "checkpoints"
        try:
            report = qat.write_program(
                self.model, self.network, folder, preprocessing=self.bundle.preprocessing,
                class_names=list(self.bundle.class_names), source=folder / "last.pt",
                batch=self.config.qat.pte_batch,
                val_batches=loader_batches(self.val_loader, limit_batches=self.config.limit_val_batches))
        except Exception as error:  # noqa: BLE001 - reported in one line; the checkpoints hold the run
            logger.warning("no %s: %s; the checkpoints are saved, retry with: mobilenetv3 quantize --checkpoint %s "
                           "--output %s", qat.PROGRAM_NAME, first_line(error), folder / "last.pt",
                           folder / qat.PROGRAM_NAME)
            return None
        comparison = report.comparison
        self.log("wrote %s (int8 ExecuTorch/XNNPACK, batch %d, %s): %s on %d val images; agreement %.2f%%",
                 report.path, report.batch, describe_bytes(report.pte_bytes),
                 top1_line(comparison, "fake-quantized"), comparison.images, comparison.agreement)
        return str(report.path)

    def _validate_average(self, module: nn.Module, prefix: str) -> dict[str, float]:
        """{prefix}_val_loss / _top1 / _top5 (the task's columns) of an averaged copy (EMA or SWA) on the
        validation set (with rank 0's buffers, the ones saved)."""
        distributed.broadcast_buffers_(module)
        result = evaluate(module, self.val_loader, self.settings, num_batches=self.config.limit_val_batches,
                          env=self.env, progress_label=f"validate {prefix.upper()}", progress=self.progress)
        return {f"{prefix}_val_{key}": result[key] for key in self.task.columns}

    # ----------------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """The epochs left: train -> validate -> averages (EMA / SWA) -> log -> save; then the final files."""
        started = time.perf_counter()
        row: dict[str, Any] = {}
        for epoch in range(self.state.epoch, self.config.epochs):
            mix_on = self._mix_on(epoch)
            totals = self._train_epoch(epoch, mix_on)
            train = distributed.all_reduce_sum([totals.loss_sum, totals.correct, totals.samples, totals.skipped],
                                               self.env.device)
            distributed.broadcast_buffers_(self.model)  # validate (and save) rank 0's BatchNorm statistics
            val = evaluate(self.model, self.val_loader, self.settings, num_batches=self.config.limit_val_batches,
                           env=self.env, progress_label="validate", progress=self.progress)
            averages = self._validate_averages(epoch)
            row = self._metrics_row(epoch, train, totals, val, averages, mix_on)
            self._log_epoch(epoch, row, totals)
            self._save_epoch(epoch, row)
        return self._finish(row, started)

    def _mix_on(self, epoch: int) -> bool:
        """Mixup / cutmix can be switched off for the last epochs (clean images to finish on)."""
        config = self.config
        return self.mix is not None and epoch < config.epochs - config.regularization.mix_off_last_epochs

    def _train_epoch(self, epoch: int, mix_on: bool) -> EpochTotals:
        """One epoch of training steps from the resume point (`state.batch_in_epoch`); this rank's totals."""
        config, state = self.config, self.state
        self.train_sampler.set_position(epoch, state.batch_in_epoch * config.batch_size)
        if config.qat.enabled and 0 < config.qat.freeze_observers_epoch <= epoch:
            qat.freeze_observers(self.model)
        bar = tqdm(total=self.steps_per_epoch, initial=state.batch_in_epoch // config.optim.accumulation_steps,
                   desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        with bar:  # closed (its line cleared) also when the epoch raises: an error gets a line of its own
            return self.train_step.run_epoch(self.train_loader, state, self.batches_per_epoch,
                                             mix=self.mix if mix_on else None, on_step_end=self._save_mid_epoch,
                                             progress=bar)

    def _validate_averages(self, epoch: int) -> dict[str, Any]:
        """The EMA's and (when it averages after this epoch) the SWA's validation columns."""
        columns: dict[str, Any] = {}
        if self.ema is not None:
            columns.update(self._validate_average(self.ema.module, "ema"))
        if self.swa is not None and self.swa.averages_after(epoch + 1):
            self.swa.update_parameters(self.model)
            # BatchNorm statistics for the new average, from this epoch's first training batches (same
            # order and augmentation as the epoch itself, so a resumed run recomputes the same values).
            self.train_sampler.set_position(epoch, 0)
            self.swa.recompute_batch_norm(self.train_loader, self.env.device, self.batches_per_epoch)
            columns.update(self._validate_average(self.swa.module, "swa"), swa_averaged=int(self.swa.n_averaged))
        return columns

    def _metrics_row(self, epoch: int, train: list[float], totals: EpochTotals, val: dict[str, float],
                     averages: dict[str, Any], mix_on: bool) -> dict[str, Any]:
        """The epoch's metrics.jsonl row; `train` holds the rank-summed loss sum, correct, samples and skipped."""
        train_loss_sum, train_correct, train_samples, train_skipped = train
        row = {
            "epoch": epoch + 1, "step": self.state.step, "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss_sum / max(train_samples, 1),
            **{f"val_{key}": val[key] for key in self.task.columns}, "val_samples": val["samples"],
            **averages,
            "world_size": self.env.world_size, "global_batch": self.global_batch, "epoch_time_s": totals.seconds,
            "train_images_per_s": train_samples / max(totals.seconds, 1e-9),
            "skipped_samples": int(train_skipped + val["skipped"]), "mixup_cutmix": mix_on,
        }
        if self.task.train_accuracy:  # detection has none
            row["train_top1"] = 100.0 * train_correct / max(train_samples, 1)
        if self.dropblock is not None:
            row["dropblock_prob"] = self.dropblock.prob
        if self.scaler.is_enabled():  # fp16: overflowing steps are skipped by the scaler, not fatal
            row["amp_skipped_steps"] = totals.amp_skipped_steps
        return row

    def _log_epoch(self, epoch: int, row: dict[str, Any], totals: EpochTotals) -> None:
        """One line per epoch (with the bars off, not a terminal, this is all a log file gets), and the fp16
        scaler's skipped steps."""
        config = self.config
        if totals.amp_skipped_steps and self.scaler.is_enabled() and self.env.is_main:
            logger.warning("epoch %d: the fp16 GradScaler skipped %d of %d steps (gradients overflowed); "
                           "loss scale now %g", epoch + 1, totals.amp_skipped_steps, self.steps_per_epoch,
                           self.scaler.get_scale())
        summary = self.task.summary
        self.log("epoch %d/%d: train loss %.4f | val loss %.4f %s (%d samples)%s%s | %.0f img/s | %.0fs",
                 epoch + 1, config.epochs, row["train_loss"], row["val_loss"], summary(row, "val_"),
                 row["val_samples"],
                 f" | EMA {summary(row, 'ema_val_')}" if "ema_val_loss" in row else "",
                 f" | SWA {summary(row, 'swa_val_')}" if "swa_val_loss" in row else "",
                 row["train_images_per_s"], totals.seconds)

    def _save_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Epoch done: record the row, then write epoch_NNNN.pt, best.pt and last.pt (rank 0) and prune."""
        config, state = self.config, self.state
        # The next resume point is the start of the next epoch.
        state.epoch, state.batch_in_epoch, state.totals = epoch + 1, 0, EpochTotals()
        metric = self.best_metric
        improved = self._is_better(row[metric])
        if improved:
            state.best_value, state.best_epoch = row[metric], epoch + 1
        row["best_epoch"] = state.best_epoch
        # Record first, then checkpoint: a crash in between redoes this epoch, and resume drops the row.
        rows = self.metrics.record(row)
        payload = self.checkpoint_payload(row)
        if self.env.is_main:
            folder = self.output / "checkpoints"
            # last.pt goes last: it commits the epoch.  Killed before it, a resume redoes the epoch and
            # rewrites best.pt / epoch_NNNN.pt identically; after it, they already exist.
            keep_epochs = config.checkpoint.keep_last_epochs or config.checkpoint.keep_best_epochs
            if keep_epochs:
                ckpt.save(folder / f"epoch_{epoch + 1:04d}.pt", ckpt.weights_only_checkpoint(payload))
            if improved:
                ckpt.save(folder / "best.pt", payload)
            self._mark_saved(ckpt.save(folder / "last.pt", payload))
            if keep_epochs:
                scores = {r["epoch"]: r[metric] for r in rows if metric in r}
                ckpt.prune_epoch_checkpoints(folder, config.checkpoint.keep_last_epochs,
                                             keep_best=config.checkpoint.keep_best_epochs, scores=scores,
                                             larger_is_better=BEST_METRICS[metric])
        distributed.barrier()

    def _finish(self, row: dict[str, Any], started: float) -> dict[str, Any]:
        """After the last epoch: close the records, write swa.safetensors and the QAT int8 program; the summary."""
        config, env, state = self.config, self.env, self.state
        self.metrics.close()
        if self.swa is not None and int(self.swa.n_averaged) > 0 and env.is_main:
            # The average (BatchNorm recomputed) as a weights file: `mobilenetv3 eval / export / predict` take it.
            save_model(self.swa.module, self.output / "checkpoints" / "swa.safetensors",
                       preprocessing=self.bundle.preprocessing, class_names=list(self.bundle.class_names),
                       extra={"swa_averaged_epochs": int(self.swa.n_averaged)})
        # QAT: the int8 program of the final graph (also when a resume found the run finished but no program)
        folder = self.output / "checkpoints"
        int8_program = None
        if config.qat.enabled and env.is_main and state.epoch and (row or not (folder / qat.PROGRAM_NAME).exists()):
            int8_program = self._write_int8_program()
        summary = {
            "output": str(self.output), "model": self.model_name, "dataset": config.data.dataset,
            "epochs": state.epoch, "steps": state.step, "world_size": env.world_size,
            "task": self.task.name, "best_metric": self.best_metric, "best_value": state.best_value,
            "best_epoch": state.best_epoch,
            "final": row, "wall_time_s": time.perf_counter() - started,
        }
        if int8_program is not None:
            summary["int8_pte"] = int8_program
        if row:
            headline = self.task.best_metric
            self.log("done: %s %.2f%% (best %s %.4g at epoch %s), %d steps in %.0fs -> %s",
                     headline, row[headline], summary["best_metric"], state.best_value, state.best_epoch,
                     state.step, summary["wall_time_s"], self.output / "checkpoints")
        return summary
