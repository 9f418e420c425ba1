"""Optimizers and schedules: exact values against torch / timm references and the formulas' key steps."""

from __future__ import annotations

import io
import math

import pytest
import torch

from mobilenetv3 import create_model
from mobilenetv3.train.config import OptimConfig, ScheduleConfig, SWAConfig
from mobilenetv3.train.optim import RMSpropTF, Schedule, build_optimizer, build_scheduler, parameter_groups, scaled_lr


def factors(cfg: ScheduleConfig, steps_per_epoch: int = 10, epochs: int = 10, base_lr: float = 1.0) -> list[float]:
    schedule = Schedule(cfg, base_lr, steps_per_epoch, epochs)
    return [schedule.lr_at(step) for step in range(steps_per_epoch * epochs)]


def test_cosine_with_warmup_key_steps():
    lr = factors(ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.01, min_lr=0.0))
    assert lr[0] == pytest.approx(0.01)
    assert lr[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr[10] == pytest.approx(1.0)  # warmup done: the peak
    assert lr[55] == pytest.approx(0.5)  # half-way through the 90 post-warmup steps
    assert lr[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # monotone after warmup
    floor = factors(ScheduleConfig(name="cosine", warmup_epochs=0, min_lr=0.1))
    assert floor[0] == pytest.approx(1.0) and min(floor) >= 0.1 and floor[-1] == pytest.approx(0.1, abs=1e-3)


def test_step_decays_once_per_epoch_with_fractional_period():
    lr = factors(ScheduleConfig(name="step", step_epochs=2.4, gamma=0.5, warmup_epochs=0))
    by_epoch = [lr[epoch * 10] for epoch in range(10)]
    # floor(epoch / 2.4): 0 0 0 1 1 2 2 2 3 3 (timm's decay_t=2.4 and torchvision's per-epoch StepLR)
    assert by_epoch == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125]
    assert len({lr[step] for step in range(30, 40)}) == 1  # constant within an epoch


def test_exponential_per_step_staircase_and_smooth():
    lr = factors(ScheduleConfig(name="exponential", step_epochs=3, gamma=0.99, warmup_epochs=0))
    assert (lr[29], lr[30], lr[59], lr[60]) == pytest.approx((1.0, 0.99, 0.99, 0.99**2))
    smooth = factors(ScheduleConfig(name="exponential", step_epochs=3, gamma=0.99, staircase=False, warmup_epochs=0))
    assert smooth[15] == pytest.approx(0.99**0.5)
    fractional = factors(ScheduleConfig(name="exponential", step_epochs=2.4, gamma=0.5, warmup_epochs=0))
    assert (fractional[23], fractional[24]) == pytest.approx((1.0, 0.5))  # decays at step 24 = 2.4 epochs


def test_multistep_and_warmup_multiplies():
    lr = factors(ScheduleConfig(name="multistep", milestones=[2, 5], gamma=0.1, warmup_epochs=0.5,
                                warmup_start_factor=0.0))
    assert (lr[0], lr[4], lr[5], lr[19], lr[20], lr[49], lr[50]) == pytest.approx((0, 0.8, 1, 1, 0.1, 0.1, 0.01))


def _torch_lrs(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = make_scheduler(optimizer)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclic_matches_torch_cycliclr(mode):
    cfg = ScheduleConfig(name="cyclic", cyclic_mode=mode, cycle_epochs=2, min_lr=0.01, cyclic_gamma=0.995)
    ours = factors(cfg, steps_per_epoch=10, epochs=10, base_lr=0.5)
    reference = _torch_lrs(lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.01, max_lr=0.5, step_size_up=10, mode=mode, gamma=0.995, cycle_momentum=False), 100)
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert ours[0] == pytest.approx(0.01) and ours[10] == pytest.approx(0.01 + 0.49 * (0.995**10 if mode == "exp_range" else 1))
    assert ours[20] == pytest.approx(0.01) and ours[30] == pytest.approx(
        0.01 + 0.49 * {"triangular": 1, "triangular2": 0.5, "exp_range": 0.995**30}[mode])


def test_one_cycle_matches_torch_onecyclelr():
    cfg = ScheduleConfig(name="onecycle", pct_start=0.3, div_factor=25, final_div_factor=1e4)
    ours = factors(cfg, steps_per_epoch=7, epochs=5, base_lr=0.2)
    reference = _torch_lrs(lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.2, total_steps=35, pct_start=0.3, div_factor=25, final_div_factor=1e4,
        anneal_strategy="cos", cycle_momentum=False), 35)
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("anneal_epochs", [0.0, 1.5])
def test_swa_hands_over_to_swalr_at_the_start_epoch(anneal_epochs):
    cfg = ScheduleConfig(name="onecycle", pct_start=0.2)
    swa = SWAConfig(enabled=True, start_epoch=6, lr_ratio=0.05, anneal_epochs=anneal_epochs)
    plain = factors(cfg, steps_per_epoch=10, epochs=10, base_lr=0.4)
    ours = Schedule(cfg, 0.4, 10, 10, swa)
    lrs = [ours.lr_at(step) for step in range(100)]
    assert lrs[:60] == plain[:60]  # the normal schedule, computed over the whole run, until averaging starts
    # then exactly torch's SWALR (cosine) from the lr reached at step 60 to 0.05 x 0.4, stepped once per step
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=plain[60])
    swalr = torch.optim.swa_utils.SWALR(optimizer, swa_lr=0.02, anneal_epochs=round(anneal_epochs * 10),
                                        anneal_strategy="cos")
    reference = []
    for _ in range(40):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        swalr.step()
    assert lrs[60:] == pytest.approx(reference, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.02)
    assert Schedule(cfg, 0.4, 10, 10, SWAConfig(enabled=False, start_epoch=6)).lr_at(70) == plain[70]


def test_scheduler_drives_the_optimizer_each_step_and_saves_plain_state():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    schedule = Schedule(ScheduleConfig(name="cosine", warmup_epochs=1), 0.3, steps_per_epoch=4, epochs=3)
    scheduler = build_scheduler(optimizer, schedule)
    for step in range(6):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(step))
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = build_scheduler(torch.optim.SGD(model.parameters(), lr=0.3), schedule)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 6 and fresh.get_last_lr() == scheduler.get_last_lr()


def test_rmsproptf_matches_timm_and_differs_from_torch():
    from timm.optim import RMSpropTF as TimmRMSpropTF

    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 4)
    ours_model, timm_model, torch_model = (torch.nn.Linear(8, 4) for _ in range(3))
    for model in (ours_model, timm_model, torch_model):
        model.load_state_dict(reference.state_dict())
    settings = dict(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5)
    optimizers = [RMSpropTF(ours_model.parameters(), **settings),
                  TimmRMSpropTF(timm_model.parameters(), **settings),
                  torch.optim.RMSprop(torch_model.parameters(), **settings)]
    for _ in range(5):
        inputs = torch.randn(16, 8)
        for model, optimizer in zip((ours_model, timm_model, torch_model), optimizers):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for ours, theirs in zip(ours_model.parameters(), timm_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours_model.weight, torch_model.weight, atol=1e-4)  # eps inside vs outside the sqrt


def test_no_weight_decay_on_norm_and_bias():
    model = create_model("mobilenetv3_small_035", num_classes=3)
    decay, no_decay = parameter_groups(model, 1e-5, skip_norm_and_bias=True)
    bn_and_bias = {id(p) for name, p in model.named_parameters() if name.endswith(".bias") or ".bn." in name}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 1e-5 and all(p.ndim > 1 for p in decay["params"])
    for name in ("sgd", "rmsproptf", "rmsprop", "adamw"):
        optimizer = build_optimizer(model, OptimConfig(name=name, weight_decay=1e-5), lr=0.1)
        assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-5, 0.0]
    sgd = build_optimizer(model, OptimConfig(name="sgd"), lr=0.1)
    assert sgd.param_groups[0]["nesterov"] is True


def test_lr_scales_linearly_with_global_batch():
    assert scaled_lr(OptimConfig(lr=0.1, lr_base_batch=4096), 1024) == pytest.approx(0.025)
    assert scaled_lr(OptimConfig(lr=0.1, lr_base_batch=None), 1024) == 0.1
