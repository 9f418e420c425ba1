"""Detection in the one trainer: COCO mAP through pycocotools, every image counted once under DDP, a killed
run resumed bit-identically, eval reproducing the logged mAP, one-line refusals."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mobilenetv3.cli import main
from mobilenetv3.data import collate_skipping, fashion_mnist
from mobilenetv3.data.samplers import ShardSampler
from mobilenetv3.train.coco import coco_map
from mobilenetv3.train.distributed import DistEnv
from mobilenetv3.train.loop import StepSettings, evaluate
from mobilenetv3.train.metrics import read_rows
from mobilenetv3.train.tasks import DetectionTask

ENV = {key: value for key, value in os.environ.items() if key != fashion_mnist.ENV_VAR}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _target(boxes, labels, crowd=None):
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.int64)}
    if crowd is not None:
        target["iscrowd"] = torch.tensor(crowd, dtype=torch.int64)
    return target


def _detections(boxes, labels, scores):
    return {**_target(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


# --- COCO mAP ------------------------------------------------------------------------------------------------

def test_perfect_detections_score_100_and_none_score_0():
    target = _target([[10, 10, 50, 50], [60, 60, 90, 100]], [1, 2])
    perfect = _detections([[10, 10, 50, 50], [60, 60, 90, 100]], [1, 2], [0.9, 0.8])
    assert coco_map([(target, perfect)], 3) == pytest.approx({"map": 100.0, "map_50": 100.0, "map_75": 100.0})
    assert coco_map([(target, _detections([], [], []))], 3) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    # no ground truth anywhere: nothing to average
    assert coco_map([(_target([], []), perfect)], 3) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}


def test_map_follows_the_iou_thresholds_and_the_classes():
    target = _target([[0, 0, 100, 100]], [1])
    # IoU 0.8 (a box 80 wide inside 100): a hit at .5 and .75, a miss at .85 and above -> 7 of 10 thresholds
    shifted = _detections([[0, 0, 80, 100]], [1], [0.9])
    result = coco_map([(target, shifted)], 2)
    assert result["map_50"] == pytest.approx(100.0) and result["map_75"] == pytest.approx(100.0)
    assert result["map"] == pytest.approx(70.0)
    # the right box with the wrong class is a miss (and a false positive of class 2, which has no ground truth)
    wrong_class = _detections([[0, 0, 100, 100]], [2], [0.9])
    assert coco_map([(target, wrong_class)], 3)["map"] == pytest.approx(0.0)
    # two classes, one found: COCOeval averages over the classes with ground truth
    two = _target([[0, 0, 100, 100], [200, 200, 300, 300]], [1, 2])
    assert coco_map([(two, _detections([[0, 0, 100, 100]], [1], [0.9]))], 3)["map"] == pytest.approx(50.0)


def test_crowd_boxes_are_neither_hits_nor_misses():
    target = _target([[0, 0, 100, 100], [200, 200, 300, 300]], [1, 1], crowd=[0, 1])
    # the crowd region undetected: not a miss
    assert coco_map([(target, _detections([[0, 0, 100, 100]], [1], [0.9]))], 2)["map"] == pytest.approx(100.0)
    # a detection inside the crowd region: not a false positive either
    both = _detections([[0, 0, 100, 100], [210, 210, 290, 290]], [1, 1], [0.5, 0.9])
    assert coco_map([(target, both)], 2)["map"] == pytest.approx(100.0)


# --- DDP: every image counted once ---------------------------------------------------------------------------

class Boxes(torch.utils.data.Dataset):
    """An odd number of images, each with 1-3 boxes of classes 1-2."""

    def __init__(self, count: int = 7) -> None:
        generator = torch.Generator().manual_seed(3)
        self.items = []
        for index in range(count):
            n = 1 + index % 3
            corner = torch.randint(0, 40, (n, 2), generator=generator).float()
            side = torch.randint(8, 24, (n, 2), generator=generator).float()
            labels = torch.randint(1, 3, (n,), generator=generator)
            target = {"boxes": torch.cat([corner, corner + side], 1), "labels": labels,
                      "iscrowd": torch.zeros(n, dtype=torch.int64), "image_id": index}
            self.items.append((torch.rand(1, 64, 64, generator=generator), target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class FixedDetector(nn.Module):
    """Detections from the targets themselves, every other box shifted (no parameters to sync)."""

    def forward_with_loss(self, images, targets):
        detections = []
        for target in targets:
            boxes = target["boxes"].clone()
            boxes[::2] += 6.0
            scores = torch.linspace(0.9, 0.5, len(boxes))
            detections.append({"boxes": boxes, "labels": target["labels"], "scores": scores})
        loss = torch.tensor(float(sum(len(t["boxes"]) for t in targets)))
        return {"bbox_regression": loss, "classification": loss / 2}, detections


def _detection_eval(env: DistEnv) -> dict:
    data = Boxes()
    loader = DataLoader(data, batch_size=2, collate_fn=collate_skipping,
                        sampler=ShardSampler(len(data), num_replicas=env.world_size, rank=env.rank))
    settings = StepSettings(device=torch.device("cpu"), amp_dtype=None, channels_last=False, accumulation_steps=1,
                            grad_clip_norm=None, label_smoothing=0.0, num_classes=3, task=DetectionTask())
    return evaluate(FixedDetector(), loader, settings, env=env)


def _ddp_rank_evaluates(rank: int, store_path: str, result_path: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = _detection_eval(DistEnv(rank=rank, world_size=2, process_group=True))
        Path(f"{result_path}.{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_the_gathered_images_are_scored_in_the_datasets_order():
    """COCOeval breaks equal scores by image order: the ranks' shards are put back in image_id order first."""
    metric = DetectionTask().metric(2, torch.device("cpu"))
    target = _target([[0, 0, 10, 10]], [1])
    losses = {"bbox_regression": torch.tensor(0.0), "classification": torch.tensor(0.0)}
    # two images, one detection each with the same score: a hit on image 0, a miss on image 1
    hit, miss = _detections([[0, 0, 10, 10]], [1], [0.5]), _detections([[50, 50, 60, 60]], [1], [0.5])
    metric.update((losses, [miss, hit]), [{**target, "image_id": 1}, {**target, "image_id": 0}])
    in_order = DetectionTask().metric(2, torch.device("cpu"))
    in_order.update((losses, [hit, miss]), [{**target, "image_id": 0}, {**target, "image_id": 1}])
    assert metric.compute(2) == in_order.compute(2)


def test_validation_decodes_boxes_in_float32_under_autocast():
    import mobilenetv3

    model = mobilenetv3.create_model("ssdlite_mobilenetv3_small", width_mult=0.35, num_classes=3, size=64).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 50, 80)]
    targets = [_target([[5, 5, 30, 40]], [1]), _target([], [])]
    with torch.no_grad():
        expected = model.forward_with_loss(images, targets)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses, detections = model.forward_with_loss(images, targets)
    assert all(d["boxes"].dtype == torch.float32 and d["scores"].dtype == torch.float32 for d in detections)
    assert all(torch.isfinite(value) for value in losses.values())
    assert len(detections) == 2 and detections[1]["boxes"].shape[1] == 4 and len(expected) == 2


def test_two_gloo_ranks_score_every_image_once_on_an_odd_sized_set(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_rank_evaluates, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads(Path(f"{tmp_path / 'result'}.{rank}").read_text()) for rank in (0, 1)]
    alone = _detection_eval(DistEnv())
    data = Boxes()
    pairs = [(target, FixedDetector().forward_with_loss(None, [target])[1][0]) for _, target in data]
    assert alone["samples"] == 7
    assert {k: alone[k] for k in ("map", "map_50", "map_75")} == coco_map(pairs, 3)
    assert 0.0 < alone["map"] < 100.0  # the shifted boxes are misses at the strict thresholds
    for result in ranks:  # 4 + 3 images: none padded in twice, every rank holds the whole set's numbers
        # (the loss is a per-batch mean, torchvision's: it depends on how the images are batched, so it is not
        # compared; the mAP is per image)
        assert {k: v for k, v in result.items() if k != "loss"} == {k: v for k, v in alone.items() if k != "loss"}


# --- training, resume, eval, refusals ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    from test_segmentation_train import write_small_fashion_mnist  # the same small Fashion-MNIST files

    return write_small_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def det_train(fashion: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mobilenetv3", "train", "--data", "fashion-mnist-det", "--data-dir", str(fashion),
            "--model", "ssdlite_mobilenetv3_small", "--set", "model.width_mult=0.35", "--input-size", "64",
            "--workers", "0", "--set", "threads=1", "--set", "data.canvas_train_samples=16",
            "--set", "data.canvas_val_samples=7", *args]  # the default label smoothing is not refused


def test_killed_detection_run_resumes_bit_identically_and_eval_reproduces_its_map(fashion_dir, tmp_path, capsys):
    from test_segmentation_train import run_ok
    from test_train_run import assert_same_tensors, kill_when

    common = ["--batch-size", "4", "--epochs", "2", "--deterministic", "--seed", "2", "--ema", "--ema-decay", "0.9",
              "--checkpoint-every-steps", "1", "--set", "optim.lr=0.01", "--set", "optim.lr_base_batch=4"]
    reference = tmp_path / "reference"
    run_ok(det_train(fashion_dir, *common, "--output", str(reference)))
    killed = tmp_path / "killed"
    payload = kill_when(det_train(fashion_dir, *common, "--output", str(killed)),
                        lambda saved: saved["epoch"] == 1 and saved["batch_in_epoch"] > 0, timeout=180)
    assert payload["batch_in_epoch"] > 0, "the kill must interrupt an epoch"
    run_ok([sys.executable, "-m", "mobilenetv3", "train", "--output", str(killed), "--resume", "--data-dir",
            str(fashion_dir)])

    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == expected["step"] == 8
    assert resumed["best"]["metric"] == "val_map"  # the task's default
    assert_same_tensors(resumed["model"], expected["model"])
    assert_same_tensors(resumed["ema"], expected["ema"])
    volatile = ("epoch_time_s", "train_images_per_s")
    strip = lambda rows: [{k: v for k, v in row.items() if k not in volatile} for row in rows]  # noqa: E731
    rows = read_rows(reference / "metrics.jsonl")
    assert strip(read_rows(killed / "metrics.jsonl")) == strip(rows)
    row = rows[-1]
    assert {"val_map", "val_map_50", "val_map_75", "val_loss", "ema_val_map"} <= set(row)
    assert "val_top1" not in row and "val_miou" not in row and row["val_samples"] == 7

    # eval on best.pt reproduces the logged numbers exactly (same data, same preprocessing, same order)
    best = reference / "checkpoints" / "best.pt"
    logged = torch.load(best, weights_only=True)["metrics"]
    assert main(["eval", "--checkpoint", str(best), "--data", "fashion-mnist-det", "--data-dir", str(fashion_dir),
                 "--workers", "0", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"map", "map_50", "map_75", "loss", "samples"}
    assert (result["map"], result["map_50"], result["map_75"], result["loss"], result["samples"]) == (
        logged["val_map"], logged["val_map_50"], logged["val_map_75"], logged["val_loss"], 7)
    assert "training logged for this checkpoint" in out and "mAP" in out


def test_torchrun_two_ranks_train_a_detection_run_scoring_every_canvas_once(fashion_dir, tmp_path, capsys):
    # torchrun (gloo on CPU): 7 validation canvases over 2 ranks are 4 + 3, each scored once
    from test_segmentation_train import run_ok

    output = tmp_path / "ddp"
    run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            *det_train(fashion_dir, "--batch-size", "4", "--epochs", "1", "--seed", "3", "--output", str(output))[2:]])
    row, = read_rows(output / "metrics.jsonl")
    assert (row["world_size"], row["val_samples"], row["global_batch"], row["step"]) == (2, 7, 8, 2)
    assert 0.0 <= row["val_map"] <= 100.0
    # the same checkpoint evaluated in one process scores the same mAP (each image's detections do not depend on
    # the rank that made them; the loss is a per-batch mean, so it is not compared)
    assert main(["eval", "--checkpoint", str(output / "checkpoints" / "last.pt"), "--data", "fashion-mnist-det",
                 "--data-dir", str(fashion_dir), "--workers", "0", "--json"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (single["map"], single["map_50"], single["samples"]) == (row["val_map"], row["val_map_50"], 7)


@pytest.mark.parametrize("args, message", [
    (["--set", "regularization.mixup_alpha=0.2"], "regularization.mixup_alpha=0.2 is for classification"),
    (["--set", "regularization.label_smoothing=0.2"], "regularization.label_smoothing=0.2 is for classification"),
    (["--set", "swa.enabled=true", "--epochs", "3"], "swa.enabled: SWA's BatchNorm recomputation feeds images without boxes"),
    (["--set", "data.random_erasing=0.2"], "data.random_erasing=0.2 is for classification (detection augments"),
    (["--set", "model.output_stride=16"], "model.output_stride is not an option of the detector"),
    (["--task", "segmentation"], "task=segmentation but the dataset 'fashion-mnist-det' is a detection"),
    (["--model", "mobilenetv3_small_035"], "is a classification model but the run's task is detection"),
    (["--set", "checkpoint.best_metric=val_miou"], "checkpoint.best_metric=val_miou is not a detection metric"),
])
def test_detection_refusals_are_one_line(fashion_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    output = tmp_path / "run"
    code = main(det_train(fashion_dir, "--epochs", "1", "--output", str(output), *args)[3:])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not output.exists()


def test_a_detection_checkpoint_is_refused_on_segmentation_data(fashion_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    output = tmp_path / "run"
    assert main(det_train(fashion_dir, "--epochs", "1", "--limit-train-batches", "1", "--batch-size", "4",
                          "--no-progress", "--output", str(output))[3:]) == 0
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(output / "checkpoints" / "last.pt"), "--data", "fashion-mnist-seg",
                 "--data-dir", str(fashion_dir), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "holds a detection model but 'fashion-mnist-seg' is a segmentation" \
        in err[0], err
