"""Regularisers that live outside the model: EMA and SWA of weights, DropBlock (ramped), mixup / cutmix.

None of them changes the model's state-dict keys: the EMA and the SWA average are separate copies,
DropBlock is applied by forward hooks on the chosen blocks, and mixup / cutmix act on the batch.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torchvision.ops import DropBlock2d, drop_block2d
from torchvision.transforms import v2

from ..errors import UserError
from . import distributed
from .config import EMAConfig, RegularizationConfig, SWAConfig

logger = logging.getLogger(__name__)


def ema_update_fn(decay: float, warmup: bool):
    """AveragedModel's multi_avg_fn for an exponential moving average.

    With warmup the decay at the t-th update is min(decay, (1 + t) / (10 + t)) (timm's ModelEmaV3 warmup):
    a 0.9999 average needs ~10k steps to forget the random initialisation, far longer than short runs.
    Integer buffers (BatchNorm's num_batches_tracked) are copied, not averaged.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        t = int(num_averaged)
        step_decay = min(decay, (1 + t) / (10 + t)) if warmup else decay
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - step_decay)
        else:
            for target, source in zip(averaged, current):
                target.copy_(source)

    return update


class ModelEma(AveragedModel):
    """EMA of the weights *and* buffers (use_buffers=True), so BatchNorm statistics are averaged too and
    the EMA model can be evaluated as is (no BN re-estimation pass, unlike SWA)."""

    def __init__(self, model: nn.Module, cfg: EMAConfig) -> None:
        super().__init__(model, multi_avg_fn=ema_update_fn(cfg.decay, cfg.warmup), use_buffers=True)
        self.every_steps = cfg.every_steps

    def maybe_update(self, model: nn.Module, step: int) -> None:
        if step % self.every_steps == 0:
            self.update_parameters(model)


class StochasticWeightAverage(AveragedModel):
    """SWA: the uniform average of the weights at the end of each epoch after `swa.start_epoch`.

    Buffers are not averaged (use_buffers=False): as in the SWA paper, the average's BatchNorm statistics
    are recomputed with `torch.optim.swa_utils.update_bn` before it is validated or saved.
    """

    def __init__(self, model: nn.Module, cfg: SWAConfig, epochs: int) -> None:
        super().__init__(model)
        self.start_epoch, self.bn_batches = cfg.first_epoch_after(epochs), cfg.bn_batches

    def averages_after(self, epochs_done: int) -> bool:
        return epochs_done > self.start_epoch

    @torch.no_grad()
    def recompute_batch_norm(self, batches: Iterable, device: torch.device, epoch_batches: int) -> None:
        """`update_bn` on the first `bn_batches` of `batches` (the epoch's `epoch_batches` when 0), then the
        statistics are pooled over the ranks, which each saw their own shard.  The caller's RNG is left as
        it was."""
        count = min(self.bn_batches or epoch_batches, epoch_batches)
        inputs = (batch[0] for batch in itertools.islice(batches, count)
                  if len(batch[0]))  # a batch of only unreadable files is empty
        # Dropout draws in train mode must not shift the run's RNG (the device's too on CUDA).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            update_bn(inputs, self.module, device=device)
        norms = [module for module in self.module.modules()
                 if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None]
        if distributed.group_size() > 1 and norms:
            # Pool mean and E[x^2] (not the variances alone, which would drop the spread between the ranks'
            # means), all in one all_reduce.
            moments = torch.cat([torch.cat([bn.running_mean, bn.running_var + bn.running_mean**2]) for bn in norms])
            distributed.average_(moments)
            offset = 0
            for bn in norms:
                size = bn.running_mean.numel()
                mean, square = moments[offset:offset + size], moments[offset + size:offset + 2 * size]
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(square - mean**2)
                offset += 2 * size


def default_dropblock_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks at the two coarsest resolutions (where DropBlock's paper applies it)."""
    network = getattr(model, "network", None)
    if network is None:
        raise UserError("DropBlock needs a MobileNetV3 model (with .network)")
    reductions, current = [], 1
    for block in network.blocks:
        current *= block.stride
        reductions.append(current)
    coarse = sorted(set(reductions))[-2:]
    return [index for index, reduction in enumerate(reductions) if reduction in coarse]


class DropBlockSchedule:
    """DropBlock2d after the output of the chosen blocks, via forward hooks (state-dict keys unchanged).

    The drop probability ramps linearly from 0 at step 0 to `dropblock_prob` at the last step, as the
    DropBlock paper recommends; call `step(global_step)` every optimizer step.  Active only while the
    model is in training mode.
    """

    def __init__(self, model: nn.Module, cfg: RegularizationConfig, total_steps: int) -> None:
        self.final_prob = cfg.dropblock_prob
        self.total_steps = max(1, total_steps)
        self.drop = DropBlock2d(p=0.0, block_size=cfg.dropblock_size)
        blocks = cfg.dropblock_blocks if cfg.dropblock_blocks is not None else default_dropblock_blocks(model)
        bad = [index for index in blocks if not 0 <= index < len(model.blocks)]
        if bad:
            raise UserError(f"regularization.dropblock_blocks {bad} out of range (the model has {len(model.blocks)} blocks)")
        self.blocks = list(blocks)
        self.handles = [model.blocks[index].register_forward_hook(self._hook) for index in self.blocks]

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not (module.training and self.drop.p > 0):
            return output
        # DropBlock2d clips the block to the feature map, which can make it even (e.g. 2 on a 2x2 map of a
        # 28x28 input) and drop_block2d rejects even sizes: use the largest odd size that fits.
        fits = min(self.drop.block_size, output.shape[-2], output.shape[-1])
        size = fits if fits % 2 == 1 else fits - 1
        return drop_block2d(output, self.drop.p, size, inplace=False, eps=self.drop.eps, training=True)

    @property
    def prob(self) -> float:
        return self.drop.p

    def step(self, global_step: int) -> None:
        self.drop.p = self.final_prob * min(1.0, global_step / self.total_steps)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def build_mix(cfg: RegularizationConfig, num_classes: int):
    """transforms.v2 MixUp and/or CutMix on a batch (one of the two, at random, when both are set)."""
    choices = []
    if cfg.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
