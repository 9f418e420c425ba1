"""The training step in isolation: accumulation, clipping, AMP, EMA arithmetic, DropBlock ramp and hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mobilenetv3 import create_model
from mobilenetv3.train.config import EMAConfig, RegularizationConfig, ScheduleConfig
from mobilenetv3.train.loop import StepSettings, TrainState, TrainStep, evaluate
from mobilenetv3.train.optim import Schedule, build_scheduler
from mobilenetv3.train.regularization import DropBlockSchedule, ModelEma, default_dropblock_blocks


def batches(count: int, size: int, features: int = 6, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=generator), torch.randint(classes, (size,), generator=generator), 0)
            for _ in range(count)]


def settings(**changes) -> StepSettings:
    values = dict(device=torch.device("cpu"), amp_dtype=None, channels_last=False, accumulation_steps=1,
                  grad_clip_norm=None, label_smoothing=0.0, num_classes=3)
    values.update(changes)
    return StepSettings(**values)


def run_epoch(model, data, optimizer, step_settings, num_batches=None, input_shape=None):
    scheduler = build_scheduler(optimizer, Schedule(ScheduleConfig(name="constant", warmup_epochs=0), 1.0, 1, 1))
    state = TrainState()
    scaler = torch.amp.GradScaler("cpu", enabled=step_settings.amp_dtype == torch.float16)
    step = TrainStep(model, optimizer, scheduler, scaler, step_settings, input_shape=input_shape)
    step.run_epoch(data, state, num_batches or len(data))
    return state


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    big_model, small_model = nn.Linear(6, 3), nn.Linear(6, 3)
    small_model.load_state_dict(big_model.state_dict())
    data = batches(4, 4)
    merged = [(torch.cat([data[i][0], data[i + 1][0]]), torch.cat([data[i][1], data[i + 1][1]]), 0) for i in (0, 2)]
    big = run_epoch(big_model, merged, torch.optim.SGD(big_model.parameters(), lr=0.5), settings())
    small = run_epoch(small_model, data, torch.optim.SGD(small_model.parameters(), lr=0.5),
                      settings(accumulation_steps=2))
    assert (big.step, small.step, small.batch_in_epoch) == (2, 2, 4)
    for a, b in zip(big_model.parameters(), small_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("amp_dtype", [None, torch.float16])
def test_empty_batches_are_skipped_but_counted(amp_dtype):
    """A batch whose every file was unreadable (B = 0) runs no forward; a group of only those makes no update."""
    from mobilenetv3.data import collate_skipping

    torch.manual_seed(0)
    model, reference = nn.Linear(6, 3), nn.Linear(6, 3)
    reference.load_state_dict(model.state_dict())
    (images, targets, _), = batches(1, 4)
    empty = collate_skipping([None] * 4)
    state = run_epoch(model, [(images, targets, 0), empty, empty, empty],
                      torch.optim.SGD(model.parameters(), lr=0.5), settings(accumulation_steps=2, amp_dtype=amp_dtype))
    assert (state.step, state.batch_in_epoch, state.totals.samples, state.totals.skipped) == (2, 4, 4, 12)
    # The update equals one of the non-empty micro-batch alone, still divided by the group size.
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.25)
    torch.nn.functional.cross_entropy(reference(images), targets).backward()
    optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3 if amp_dtype else 1e-6, atol=1e-3 if amp_dtype else 1e-7)


def test_non_finite_loss_is_caught_at_the_next_sync_naming_its_step():
    """The running sums stay on the device between syncs; a NaN loss at step 2 still stops the epoch, naming it."""
    from mobilenetv3.errors import UserError

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    data = batches(4, 4)
    data[1] = (torch.full((4, 6), float("nan")), data[1][1], 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = build_scheduler(optimizer, Schedule(ScheduleConfig(name="constant", warmup_epochs=0), 1.0, 1, 1))
    step = TrainStep(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), settings(),
                     sync_every=100)
    state = TrainState()
    with pytest.raises(UserError, match=r"the training loss became nan at step 2;"):
        step.run_epoch(data, state, len(data))
    assert state.step == 4  # no sync before the epoch's end: the check came there, within the epoch


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    before = [p.detach().clone() for p in model.parameters()]
    run_epoch(model, batches(1, 8), torch.optim.SGD(model.parameters(), lr=1.0), settings(grad_clip_norm=1e-3))
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert update.norm() == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_steps_update_the_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    data = [(torch.randn(4, 1, 12, 12), torch.randint(3, (4,)), 0) for _ in range(2)]
    before = model[-1].weight.detach().clone()
    state = run_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), settings(amp_dtype=dtype))
    assert state.step == 2 and torch.isfinite(torch.tensor(state.totals.loss_sum))
    assert not torch.equal(before, model[-1].weight)
    result = evaluate(model, data, settings(amp_dtype=dtype))
    assert result["samples"] == 8 and 0 <= result["top1"] <= 100


def test_ema_is_an_exponential_average_of_weights_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, EMAConfig(enabled=True, decay=0.75, warmup=False))
    ema.update_parameters(model)  # the first update copies
    snapshot = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model.train()
    model(torch.randn(8, 4))  # moves BN running stats and num_batches_tracked
    ema.update_parameters(model)
    current = model.state_dict()
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * snapshot[key] + 0.25 * current[key])
        else:
            assert torch.equal(value, current[key])  # integer buffers follow the model


def test_dropblock_ramps_and_keeps_state_dict_keys():
    model = create_model("mobilenetv3_small_035", num_classes=3)
    keys = list(model.state_dict())
    blocks = default_dropblock_blocks(model)
    assert blocks == [3, 4, 5, 6, 7, 8, 9, 10]  # strides 16 and 32 of MobileNetV3-Small
    dropblock = DropBlockSchedule(model, RegularizationConfig(dropblock_prob=0.2, dropblock_size=3), total_steps=100)
    assert list(model.state_dict()) == keys
    probs = []
    for step in (0, 50, 100, 150):
        dropblock.step(step)
        probs.append(dropblock.prob)
    assert probs == pytest.approx([0.0, 0.1, 0.2, 0.2])
    block = model.blocks[blocks[0]]
    features = torch.randn(2, model.network.blocks[blocks[0]].in_channels, 8, 8)
    block.eval()
    with torch.no_grad():
        reference = block(features)
        torch.testing.assert_close(block(features), reference)  # eval mode: no DropBlock
        block.train()
        for module in block.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # isolate DropBlock from batch statistics
        dropped = block(features)
        assert (dropped == 0).float().mean() > (reference == 0).float().mean()  # whole blocks zeroed
        dropblock.remove()
        torch.testing.assert_close(block(features), reference)  # the hook is gone


def _ddp_rank_with_broken_first_batch(rank: int, store_path: str, result_path: str) -> None:
    """One gloo rank: rank 1's first micro-batch is all unreadable files (B = 0), rank 0's is real."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mobilenetv3.data import collate_skipping

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Linear(6, 3))
        data = batches(2, 4, seed=rank)
        if rank == 1:
            data[0] = collate_skipping([None] * 4)
        state = run_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.5), settings(), input_shape=(6,))
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"step": state.step, "weights": weights}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_rank_whose_first_batch_is_all_broken_still_joins_the_all_reduce(tmp_path):
    """Without a stand-in shape known up front, rank 1 would skip its first backward and rank 0 would wait forever."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_rank_with_broken_first_batch, args=(str(tmp_path / "store"), str(tmp_path / "result")),
                       nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"result.{rank}", weights_only=True) for rank in (0, 1)]
    assert [r["step"] for r in results] == [2, 2]
    torch.testing.assert_close(results[0]["weights"], results[1]["weights"], rtol=0, atol=0)  # replicas in sync


def test_ddp_alone_skips_an_empty_group_like_a_plain_run(tmp_path):
    """torchrun with one process: an all-unreadable batch makes no update (momentum would move the weights)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mobilenetv3.data import collate_skipping

    def train(wrap):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        data = batches(3, 4)
        data[1] = collate_skipping([None] * 4)
        state = run_epoch(wrap(model), data, optimizer, settings(), input_shape=(6,))
        return state.step, torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = train(lambda model: model)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        alone = train(DistributedDataParallel)
    finally:
        dist.destroy_process_group()
    assert plain[0] == alone[0] == 3
    torch.testing.assert_close(alone[1], plain[1], rtol=0, atol=0)


def _rank_zero_first_worker(rank: int, store_path: str, log_path: str) -> None:
    """Three gloo ranks as two nodes: ranks 0 and 1 on the first (local ranks 0, 1), rank 2 alone on the second."""
    import time

    import torch.distributed as dist

    from mobilenetv3.train.distributed import DistEnv, rank_zero_first

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 3), rank=rank, world_size=3,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        env = DistEnv(rank=rank, world_size=3, local_rank=(0, 1, 0)[rank], process_group=True)
        with rank_zero_first(env):
            with open(log_path, "a") as log:
                log.write(f"start {rank}\n")
            time.sleep(0.3)  # long enough for a rank that did not wait to start inside this window
            with open(log_path, "a") as log:
                log.write(f"end {rank}\n")
    finally:
        dist.destroy_process_group()


def test_rank_zero_first_then_each_node_first_process_then_the_rest(tmp_path):
    """The block (a dataset download in training) runs on rank 0 alone, then on the other node's first
    process, then on the remaining ranks: never in two processes of one filesystem at once."""
    import torch.multiprocessing as mp

    log = tmp_path / "log"
    mp.start_processes(_rank_zero_first_worker, args=(str(tmp_path / "store"), str(log)), nprocs=3,
                       start_method="spawn")
    assert log.read_text().split("\n")[:-1] == ["start 0", "end 0", "start 2", "end 2", "start 1", "end 1"]
