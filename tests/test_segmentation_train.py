"""Segmentation in the one trainer: the confusion matrix and its scores, every pixel counted once under DDP,
ignored pixels left out, a killed run resumed bit-identically, eval reproducing the logged mIoU, one-line
refusals."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mobilenetv3.cli import main
from mobilenetv3.data import collate_skipping, fashion_mnist
from mobilenetv3.data.samplers import ShardSampler
from mobilenetv3.train.distributed import DistEnv
from mobilenetv3.train.loop import StepSettings, evaluate
from mobilenetv3.train.metrics import read_rows
from mobilenetv3.train.tasks import IGNORE_INDEX, SegmentationTask, confusion_matrix, segmentation_scores

ENV = {key: value for key, value in os.environ.items() if key != fashion_mnist.ENV_VAR}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# --- the confusion matrix and its scores ---------------------------------------------------------------------

def test_confusion_matrix_counts_pixels_by_target_and_prediction_and_skips_ignored():
    target = torch.tensor([[0, 0, 1, IGNORE_INDEX], [2, 2, 1, IGNORE_INDEX]])
    predicted = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]])
    confusion = confusion_matrix(predicted, target, 4)
    assert confusion.dtype == torch.int64
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in ((0, 0), (0, 1), (1, 1), (2, 2), (2, 0), (1, 1)):  # the two 255 pixels are not counted
        expected[t, p] += 1
    assert torch.equal(confusion, expected)
    scores = segmentation_scores(confusion)
    assert scores["pixels"] == 6
    assert scores["pixel_acc"] == pytest.approx(100 * 4 / 6)
    # IoU = hits / (row + column - hits): class 0: 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / 2;
    # class 3 is in neither the target nor the prediction: no IoU, left out of the mean.
    iou = [100 / 3, 200 / 3, 50.0]
    assert scores["iou"][:3] == pytest.approx(iou) and scores["iou"][3] is None
    assert scores["miou"] == pytest.approx(sum(iou) / 3)


def test_a_class_only_predicted_counts_with_iou_zero():
    scores = segmentation_scores(confusion_matrix(torch.tensor([1, 1]), torch.tensor([0, 0]), 2))
    assert scores["iou"] == [0.0, 0.0] and scores["miou"] == 0.0 and scores["pixel_acc"] == 0.0


def test_a_batch_of_only_ignored_pixels_has_loss_zero_not_nan():
    # a random crop can leave a micro-batch with no labelled pixel; NaN would stop the run as a diverged loss
    task = SegmentationTask()
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    loss = task.loss(logits, torch.full((2, 4, 5), IGNORE_INDEX), label_smoothing=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    targets = torch.randint(0, 3, (2, 4, 5))
    targets[0] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    assert torch.allclose(task.loss(logits, targets, label_smoothing=0.0), expected)


def test_ignored_pixels_change_neither_the_loss_nor_the_metric():
    """The same logits, with pixels marked 255 where the prediction is wrong: those pixels are not counted."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    wrong = logits.argmax(1) != target
    ignored = target.masked_fill(wrong, IGNORE_INDEX)
    metric = SegmentationTask().metric(3, torch.device("cpu"))
    metric.update(logits, ignored)
    result = metric.compute(samples=2)
    assert result["pixels"] == int((~wrong).sum()) and result["pixel_acc"] == 100.0
    kept = ~wrong
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert result["loss"] == pytest.approx(float(per_pixel[kept].mean()), rel=1e-6)
    assert SegmentationTask().loss(logits, ignored, 0.0).item() == pytest.approx(float(per_pixel[kept].mean()),
                                                                                  rel=1e-6)


# --- DDP: every pixel counted once ---------------------------------------------------------------------------

class Masks(torch.utils.data.Dataset):
    """An odd number of (image, mask) pairs; each mask has some ignored pixels."""

    def __init__(self, count: int = 7, size: int = 6, classes: int = 3) -> None:
        generator = torch.Generator().manual_seed(5)
        self.images = torch.randn(count, 1, size, size, generator=generator)
        self.masks = torch.randint(0, classes, (count, size, size), generator=generator)
        self.masks[:, 0, :2] = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index]


class FixedSegmenter(nn.Module):
    """Deterministic logits from the image (no parameters to sync): {"out": [B, 3, H, W]}."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": torch.cat([images, -images, images.abs() - 0.5], dim=1)}


def _segmentation_eval(env: DistEnv) -> dict:
    data = Masks()
    loader = DataLoader(data, batch_size=2, collate_fn=collate_skipping,
                        sampler=ShardSampler(len(data), num_replicas=env.world_size, rank=env.rank))
    settings = StepSettings(device=torch.device("cpu"), amp_dtype=None, channels_last=False, accumulation_steps=1,
                            grad_clip_norm=None, label_smoothing=0.0, num_classes=3, task=SegmentationTask())
    return evaluate(FixedSegmenter(), loader, settings, env=env)


def _ddp_rank_evaluates(rank: int, store_path: str, result_path: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = _segmentation_eval(DistEnv(rank=rank, world_size=2, process_group=True))
        Path(f"{result_path}.{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_count_every_pixel_once_on_an_odd_sized_set(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_rank_evaluates, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads(Path(f"{tmp_path / 'result'}.{rank}").read_text()) for rank in (0, 1)]
    alone = _segmentation_eval(DistEnv())
    data = Masks()
    assert alone["samples"] == 7 and alone["pixels"] == int((data.masks != IGNORE_INDEX).sum())
    for result in ranks:  # 4 + 3 images: no sample padded in twice, every rank holds the whole set's numbers
        # the confusion matrix is summed exactly (int64); the loss only up to float32 sums over other batches
        assert {k: v for k, v in result.items() if k != "loss"} == {k: v for k, v in alone.items() if k != "loss"}
        assert result["loss"] == pytest.approx(alone["loss"], rel=1e-6)


# --- training, resume, eval, refusals ------------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    return write_small_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def write_small_fashion_mnist(root: Path) -> Path:
    """Small Fashion-MNIST files: a bright square of a size that depends on the class."""
    for split, count in (("train", 40), ("test", 20)):
        labels = np.arange(count) % 10
        images = np.zeros((count, 28, 28), np.uint8)
        for index, label in enumerate(labels):
            half = 4 + label
            images[index, 14 - half:14 + half, 14 - half:14 + half] = 120 + 12 * label
        images_name, labels_name = fashion_mnist.FILES[split]
        _write_idx(root / images_name, images)
        _write_idx(root / labels_name, labels)
    return root


def seg_train(fashion: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mobilenetv3", "train", "--data", "fashion-mnist-seg", "--data-dir", str(fashion),
            "--model", "lraspp_mobilenetv3_small_035", "--input-size", "32", "--workers", "0",
            "--set", "threads=1", "--set", "data.canvas_train_samples=24", "--set", "data.canvas_val_samples=11",
            "--set", "regularization.label_smoothing=0", *args]


def run_ok(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_killed_segmentation_run_resumes_bit_identically_and_eval_reproduces_its_miou(fashion_dir, tmp_path,
                                                                                      capsys):
    from test_train_run import assert_same_tensors, kill_when

    common = ["--batch-size", "4", "--epochs", "2", "--deterministic", "--seed", "2", "--ema", "--ema-decay", "0.9",
              "--checkpoint-every-steps", "1", "--set", "optim.lr=0.01", "--set", "optim.lr_base_batch=4"]
    reference = tmp_path / "reference"
    run_ok(seg_train(fashion_dir, *common, "--output", str(reference)))
    killed = tmp_path / "killed"
    payload = kill_when(seg_train(fashion_dir, *common, "--output", str(killed)),
                        lambda saved: saved["epoch"] == 1 and saved["batch_in_epoch"] > 0, timeout=120)
    assert payload["batch_in_epoch"] > 0, "the kill must interrupt an epoch"
    run_ok([sys.executable, "-m", "mobilenetv3", "train", "--output", str(killed), "--resume", "--data-dir",
            str(fashion_dir)])

    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == expected["step"] == 12
    assert resumed["best"]["metric"] == "val_miou"  # the task's default
    assert_same_tensors(resumed["model"], expected["model"])
    assert_same_tensors(resumed["ema"], expected["ema"])
    volatile = ("epoch_time_s", "train_images_per_s")
    strip = lambda rows: [{k: v for k, v in row.items() if k not in volatile} for row in rows]  # noqa: E731
    rows = read_rows(reference / "metrics.jsonl")
    assert strip(read_rows(killed / "metrics.jsonl")) == strip(rows)
    row = rows[-1]
    assert {"val_miou", "val_pixel_acc", "val_iou", "ema_val_miou"} <= set(row) and len(row["val_iou"]) == 11
    assert "val_top1" not in row and row["val_samples"] == 11

    # eval on best.pt reproduces the logged numbers exactly (same data, same preprocessing, same order)
    best = reference / "checkpoints" / "best.pt"
    logged = torch.load(best, weights_only=True)["metrics"]
    assert main(["eval", "--checkpoint", str(best), "--data", "fashion-mnist-seg", "--data-dir", str(fashion_dir),
                 "--workers", "0", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["miou"] == logged["val_miou"] and result["pixel_acc"] == logged["val_pixel_acc"]
    assert result["iou"] == logged["val_iou"] and result["loss"] == logged["val_loss"] and result["samples"] == 11
    assert "training logged for this checkpoint" in out and "mIoU" in out


def test_torchrun_two_ranks_train_a_segmentation_run_counting_every_canvas_once(fashion_dir, tmp_path):
    # torchrun (gloo on CPU): 11 validation canvases over 2 ranks are 6 + 5, each counted once; the plain
    # 1x1-conv head (model.head) trains through the same path
    output = tmp_path / "ddp"
    run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            *seg_train(fashion_dir, "--batch-size", "4", "--epochs", "1", "--seed", "3", "--output", str(output),
                       "--set", "model.head=conv1x1")[2:]])
    row, = read_rows(output / "metrics.jsonl")
    assert (row["world_size"], row["val_samples"], row["global_batch"], row["step"]) == (2, 11, 8, 3)
    assert 0.0 <= row["val_miou"] <= 100.0 and len(row["val_iou"]) == 11
    saved = torch.load(output / "checkpoints" / "last.pt", weights_only=True)
    assert saved["model_kwargs"]["head"] == "conv1x1"
    assert set(k.split(".")[1] for k in saved["model"] if k.startswith("classifier.")) == {"high_classifier"}


@pytest.mark.parametrize("args, message", [
    (["--set", "model.head=conv1x1", "--model", "mobilenetv3_small_035", "--task", "classification",
      "--data", "fashion-mnist"], "model.head=conv1x1 is an option of the segmentation models, not of "
     "mobilenetv3_small_035"),
    (["--set", "regularization.mixup_alpha=0.2"], "mixup and cutmix blend image labels, not masks"),
    (["--set", "data.random_erasing=0.2"], "data.random_erasing=0.2 is for classification (segmentation augments"),
    (["--task", "classification"], "task=classification but the dataset 'fashion-mnist-seg' is a segmentation"),
    (["--model", "mobilenetv3_small_035"], "is a classification model but the run's task is segmentation"),
    (["--set", "checkpoint.best_metric=val_top1"], "checkpoint.best_metric=val_top1 is not a segmentation metric"),
])
def test_segmentation_refusals_are_one_line(fashion_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    output = tmp_path / "run"
    code = main(seg_train(fashion_dir, "--epochs", "1", "--output", str(output), *args)[3:])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not output.exists()


def test_a_segmentation_checkpoint_is_refused_on_classification_data(fashion_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    output = tmp_path / "run"
    assert main(seg_train(fashion_dir, "--epochs", "1", "--limit-train-batches", "1", "--batch-size", "4",
                          "--no-progress", "--output", str(output))[3:]) == 0
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(output / "checkpoints" / "last.pt"), "--data", "fashion-mnist",
                 "--data-dir", str(fashion_dir), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "holds a segmentation model but 'fashion-mnist' is a classification" \
        in err[0], err


def test_training_starts_from_a_segmentation_weights_file(fashion_dir, tmp_path, capsys, monkeypatch):
    """model.pretrained with an LR-ASPP file: the run's kwargs default to LR-ASPP's own (output stride 16), and
    the generic builder of the same head takes it."""
    from mobilenetv3 import create_model, save_model

    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    source = create_model("lraspp_mobilenetv3_small_035", num_classes=11, in_chans=1)
    weights = tmp_path / "seg.safetensors"
    save_model(source, weights)
    output = tmp_path / "run"
    assert main(seg_train(fashion_dir, "--epochs", "1", "--limit-train-batches", "1", "--batch-size", "4",
                          "--no-progress", "--pretrained", str(weights), "--output", str(output))[3:]) == 0
    saved = torch.load(output / "checkpoints" / "last.pt", weights_only=True)
    assert saved["model_name"] == "lraspp_mobilenetv3_small_035"
    assert saved["model_kwargs"]["output_stride"] == 16 and saved["model_kwargs"]["num_classes"] == 11
