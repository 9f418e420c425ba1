"""Optimizers (SGD-Nesterov, TF-style RMSProp, AdamW) and per-step learning-rate schedules.

Every schedule is a pure function `factor(step)` of the optimizer step, multiplied into the base
learning rate by `torch.optim.lr_scheduler.LambdaLR`.  The scheduler therefore moves every step (not
every epoch), its state is one integer (exact resume), and the shape of each schedule is testable
without training (`lr_at`).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..errors import UserError
from .config import OptimConfig, ScheduleConfig, SWAConfig


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow (and the paper's training) computes it: epsilon *inside* the square root.

    torch.optim.RMSprop divides by sqrt(v) + eps; TF divides by sqrt(v + eps).  With the paper's eps of
    1e-3 the two differ by orders of magnitude early in training (sqrt(1e-3) = 0.03 vs 1e-3), so TF recipes
    need this form.  Like TF, the mean-square accumulator starts at 1 (not 0), and momentum is applied
    to the already-scaled step (lr inside the momentum buffer), so changing lr mid-run does not cause a jump:

        v   <- alpha * v + (1 - alpha) * g^2
        buf <- momentum * buf + lr * g / sqrt(v + eps)
        p   <- p - buf

    Weight decay is L2 added to the gradient (as in TF's regularisation loss).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        alpha: float = 0.9,
        eps: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps <= 0 or not 0 <= alpha <= 1 or momentum < 0 or weight_decay < 0:
            raise UserError(f"invalid RMSpropTF settings lr={lr} alpha={alpha} eps={eps} momentum={momentum}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if not state:
                    state["square_avg"] = torch.ones_like(param)
                    state["momentum_buffer"] = torch.zeros_like(param)
                square_avg = state["square_avg"]
                square_avg.mul_(group["alpha"]).addcmul_(grad, grad, value=1 - group["alpha"])
                update = grad / square_avg.add(group["eps"]).sqrt_()
                if group["momentum"] > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(update, alpha=group["lr"])
                    param.sub_(buf)
                else:
                    param.sub_(update, alpha=group["lr"])
        return loss


def parameter_groups(model: nn.Module, weight_decay: float, skip_norm_and_bias: bool) -> list[dict]:
    """Two groups: weights that decay, and norm weights + biases (all 1-D tensors) that do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if skip_norm_and_bias and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule: lr is given for `lr_base_batch` images per step."""
    return cfg.lr if cfg.lr_base_batch is None else cfg.lr * global_batch / cfg.lr_base_batch


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay, cfg.no_decay_norm_and_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "rmsproptf":
        return RMSpropTF(groups, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum)
    if cfg.name == "rmsprop":  # torch's (eps outside the sqrt), as torchvision's recipe uses it
        return torch.optim.RMSprop(groups, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise UserError(f"unknown optimizer {cfg.name!r}")


class Schedule:
    """factor(step) for one `ScheduleConfig`; lr(step) = base_lr * factor(step).

    Warmup multiplies any schedule by a linear ramp from `warmup_start_factor` to 1 over the warmup
    steps.  Cosine decays over the steps after warmup; step-based schedules count from step 0, so their
    decay points do not move with the warmup (as in timm and TF-slim).  Cyclic and one-cycle carry their
    own ramps and ignore warmup.  With SWA enabled the schedule hands over to SWALR's anneal-then-constant
    at `swa.start_epoch` (the schedule itself keeps its full length, as in torch's SWA example).
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int, epochs: int,
                 swa: SWAConfig | None = None) -> None:
        if steps_per_epoch < 1:
            raise UserError("the training set gives no full optimizer step (fewer samples than one batch?)")
        self.cfg, self.base_lr = cfg, base_lr
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        self.min_factor = min(cfg.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
        self.swa = swa if swa is not None and swa.enabled else None
        if self.swa is not None:
            self.swa_start_step = self.swa.first_epoch_after(epochs) * steps_per_epoch
            self.swa_anneal_steps = round(self.swa.anneal_epochs * steps_per_epoch)

    def __call__(self, step: int) -> float:
        if self.swa is not None and step >= self.swa_start_step:
            return self._swa(step)
        return self._schedule(step)

    def _swa(self, step: int) -> float:
        """torch.optim.swa_utils.SWALR's cosine: from the schedule's lr at the start of averaging to
        lr_ratio x base lr over the anneal steps, then constant."""
        start = self._schedule(self.swa_start_step)
        done = step - self.swa_start_step
        progress = min(1.0, done / self.swa_anneal_steps) if self.swa_anneal_steps > 0 else 1.0
        alpha = (1 - math.cos(math.pi * progress)) / 2
        return self.swa.lr_ratio * alpha + start * (1 - alpha)

    def _schedule(self, step: int) -> float:
        cfg = self.cfg
        if cfg.name == "cyclic":
            return self._cyclic(step)
        if cfg.name == "onecycle":
            return self._one_cycle(step)
        factor = self._main(step)
        if step < self.warmup_steps:
            factor *= cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / self.warmup_steps
        return factor

    def _main(self, step: int) -> float:
        cfg = self.cfg
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0, step - self.warmup_steps) / span)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "step":  # once per epoch, torchvision StepLR / timm step with fractional decay_t
            return cfg.gamma ** math.floor(step // self.steps_per_epoch / cfg.step_epochs)
        if cfg.name == "exponential":  # per step, TF-slim exponential_decay(decay_steps=N epochs)
            exponent = step / (cfg.step_epochs * self.steps_per_epoch)
            return cfg.gamma ** (math.floor(exponent) if cfg.staircase else exponent)
        if cfg.name == "multistep":
            epoch = step / self.steps_per_epoch
            return cfg.gamma ** sum(epoch >= milestone for milestone in cfg.milestones)
        raise UserError(f"unknown schedule {cfg.name!r}")

    def _cyclic(self, step: int) -> float:
        """torch.optim.lr_scheduler.CyclicLR's formula, between min_lr and lr, half a cycle up then down."""
        cfg = self.cfg
        half = max(1.0, cfg.cycle_epochs * self.steps_per_epoch / 2)
        cycle = math.floor(1 + step / (2 * half))
        x = 1.0 + step / (2 * half) - cycle
        position = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)
        if cfg.cyclic_mode == "triangular":
            scale = 1.0
        elif cfg.cyclic_mode == "triangular2":
            scale = 1 / (2.0 ** (cycle - 1))
        else:
            scale = cfg.cyclic_gamma**step
        return self.min_factor + (1 - self.min_factor) * position * scale

    def _one_cycle(self, step: int) -> float:
        """torch.optim.lr_scheduler.OneCycleLR (cos annealing, two phases), as a factor of the peak lr."""
        cfg = self.cfg
        initial = 1 / cfg.div_factor
        final = initial / cfg.final_div_factor
        up_end = float(cfg.pct_start * self.total_steps) - 1
        down_end = float(self.total_steps) - 1

        def cos_anneal(start: float, end: float, pct: float) -> float:
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

        if step <= up_end:
            return cos_anneal(initial, 1.0, step / up_end if up_end > 0 else 1.0)
        return cos_anneal(1.0, final, min(1.0, (step - up_end) / (down_end - up_end)))

    def lr_at(self, step: int) -> float:
        return self.base_lr * self(step)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> "StepLambdaLR":
    return StepLambdaLR(optimizer, schedule)


class StepLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose state is plain data: the schedule is rebuilt from the config, only the step is saved.

    (LambdaLR would store the Schedule object's __dict__, config dataclass included, which
    `torch.load(weights_only=True)` rightly refuses.)
    """

    def state_dict(self) -> dict:
        return {key: value for key, value in super().state_dict().items() if key != "lr_lambdas"}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
