"""Detection data: fashion-mnist-det's boxes against the masks, the SSD augmentation, COCO-format folders."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import tv_tensors

from mobilenetv3 import Preprocessing, UserError
from mobilenetv3.data import DataConfig, build_datasets, check_data_config, collate_skipping
from mobilenetv3.data import detection, fashion_mnist, segmentation
from mobilenetv3.data.samplers import SeededSamples, sample_seed
from mobilenetv3.data.transforms import detection_eval_transform, detection_train_transform

#: for the tests that read COCO-format folders: torchvision's CocoDetection reads them through pycocotools
needs_pycocotools = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None,
                                       reason="reading COCO-format folders needs pycocotools")


# --- fashion-mnist-det: boxes of the items' visible pixels ------------------------------------------------------


def _items(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob-like 28x28 items (a bright random rectangle on black, faint noise around) and labels 0..9."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 15, (count, 28, 28), dtype=np.uint8)
    for index in range(count):
        top, left = rng.integers(2, 12, 2)
        items[index, top:top + 14, left:left + 12] = rng.integers(60, 256)
    return torch.from_numpy(items), torch.from_numpy(np.arange(count) % 10)


def _extent(pixels: torch.Tensor) -> list[int]:
    """(x0, y0, x1, y1), exclusive ends, of the True pixels of a [H, W] mask; zeros when there are none."""
    if not pixels.any():
        return [0, 0, 0, 0]
    rows, cols = pixels.any(1).nonzero()[:, 0], pixels.any(0).nonzero()[:, 0]
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def _own_pixels(items: torch.Tensor, canvases: segmentation.Canvases, index: int, slot: int) -> torch.Tensor:
    """Canvas-sized mask of the pixels item `slot` of canvas `index` draws brighter than the threshold, redrawn
    here from the item and its square (independently of make_canvases' owners)."""
    x0, y0, x1, y1 = canvases.boxes[index, slot].tolist()
    item = items[int(canvases.items[index, slot])][None, None].float()
    scaled = (nnf.interpolate(item, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0, 0] + 0.5)
    own = torch.zeros(segmentation.CANVAS_SIZE, segmentation.CANVAS_SIZE, dtype=torch.bool)
    own[y0:y1, x0:x1] = scaled.to(torch.uint8) > segmentation.CANVAS_THRESHOLD
    return own


def test_boxes_are_the_tight_boxes_of_each_items_visible_pixels():
    """Each item's box is the extent of its own bright pixels that no later item's bright pixels cover (recomputed
    here item by item); hidden items have no box, mostly hidden ones are crowd; the items' visible pixels are
    disjoint and together the mask's (their boxes may overlap)."""
    items, labels = _items(40)
    canvases = segmentation.make_canvases(items, labels, 40, 5, owners=True)
    dataset = detection.CanvasDetection(canvases, labels, "train")
    covered_somewhere = crowd_seen = 0
    for index in range(len(dataset)):
        used = int((canvases.items[index] >= 0).sum())
        own = [_own_pixels(items, canvases, index, slot) for slot in range(used)]
        owned = torch.zeros_like(own[0])
        expected = []
        for slot in reversed(range(used)):  # from the top down: what is not covered yet is visible
            visible = own[slot] & ~owned
            owned |= own[slot]
            label = int(labels[canvases.items[index, slot]]) + 1
            assert (canvases.masks[index][visible] == label).all()  # the mask labels those pixels with its class
            covered_somewhere += bool((own[slot] & ~visible).any())
            if visible.any():
                crowd = int(visible.sum()) < detection.CANVAS_MIN_VISIBLE * int(own[slot].sum())
                crowd_seen += crowd
                expected.append((slot, _extent(visible), label, int(crowd)))
        assert torch.equal(owned, canvases.masks[index] > 0)  # the visible pixels together are the mask's
        expected.sort()
        _, target = dataset.load(index)
        assert target["boxes"].tolist() == [box for _, box, _, _ in expected]
        assert target["labels"].tolist() == [label for _, _, label, _ in expected]
        assert target["iscrowd"].tolist() == [crowd for _, _, _, crowd in expected]
        assert target["image_id"] == index and target["boxes"].canvas_size == (128, 128)
    assert covered_somewhere > 10 and crowd_seen > 0  # the test saw occlusion, and crowd boxes


def test_owners_agree_with_the_masks_and_leave_the_canvases_unchanged():
    items, labels = _items(30)
    plain = segmentation.make_canvases(items, labels, 25, 2)
    canvases = segmentation.make_canvases(items, labels, 25, 2, owners=True)
    for name in ("images", "masks", "items", "boxes"):  # fashion-mnist-seg's canvases are what they were
        assert torch.equal(getattr(plain, name), getattr(canvases, name)), name
    assert plain.owners is None and plain.areas is None
    owned = canvases.owners != segmentation.NO_OWNER
    assert torch.equal(owned, canvases.masks > 0)
    slot = canvases.owners.long().clamp(max=segmentation.CANVAS_MAX_ITEMS - 1)
    source = torch.gather(canvases.items, 1, slot.flatten(1)).view_as(slot)
    assert torch.equal(canvases.masks[owned].long(), labels[source[owned]] + 1)


def test_boxes_of_items_apart_are_the_masks_extents():
    """Where an item's square overlaps no other item's, its box is simply the extent of the mask's labelled
    pixels inside its square: the masks alone say where the box is."""
    items, labels = _items(40, seed=1)
    canvases = segmentation.make_canvases(items, labels, 100, 7, owners=True)
    dataset = detection.CanvasDetection(canvases, labels, "train")
    checked = 0
    for index in range(len(dataset)):
        squares = canvases.boxes[index][canvases.items[index] >= 0]
        for slot, (x0, y0, x1, y1) in enumerate(squares.tolist()):
            others = [s for k, s in enumerate(squares.tolist()) if k != slot]
            if any(a < x1 and x0 < c and b < y1 and y0 < d for a, b, c, d in others):
                continue
            inside = torch.zeros(128, 128, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            box = _extent((canvases.masks[index] > 0) & inside)
            assert dataset.boxes[index, slot].tolist() == box and dataset.kept[index, slot]
            assert dataset.iscrowd[index, slot] == 0
            checked += 1
    assert checked > 20


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch) -> Path:
    """Fashion-MNIST files whose train items are all 200 and test items all 100 (labels index % 10)."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    for split, count, value in (("train", 30, 200), ("test", 20, 100)):
        images_name, labels_name = fashion_mnist.FILES[split]
        _write_idx(tmp_path / images_name, np.full((count, 28, 28), value))
        _write_idx(tmp_path / labels_name, np.arange(count) % 10)
    return tmp_path


def test_fashion_mnist_det_bundle(fake_fashion):
    cfg = DataConfig(dataset="fashion-mnist-det", data_dir=str(fake_fashion), canvas_train_samples=12,
                     canvas_val_samples=5)
    bundle = build_datasets(cfg)
    assert (bundle.task, bundle.num_classes, bundle.in_chans, bundle.ignore_index) == ("detection", 11, 1, None)
    assert bundle.class_names == segmentation.CANVAS_CLASSES and bundle.class_names[0] == "background"
    assert bundle.preprocessing == Preprocessing(input_size=128, crop_pct=1.0, mean=segmentation.CANVAS_MEAN,
                                                 std=segmentation.CANVAS_STD, in_chans=1)
    assert bundle.model_defaults == {"in_chans": 1, "size": 128, "image_mean": list(segmentation.CANVAS_MEAN),
                                     "image_std": list(segmentation.CANVAS_STD)}
    assert "detection" in bundle.describe() and "None" not in bundle.describe()
    # the same canvases as fashion-mnist-seg's, train ones from train items only, val ones from test items only
    seg = build_datasets(DataConfig(**{**cfg.__dict__, "dataset": "fashion-mnist-seg"}))
    for det, masks, source, value, count in ((bundle.train, seg.train, "train", 200, 30),
                                             (bundle.val, seg.val, "test", 100, 20)):
        assert det.source == source and torch.equal(det.canvases.images, masks.canvases.images)
        assert torch.equal(det.canvases.items, masks.canvases.items)
        assert det.canvases.items.max() < count and set(det.canvases.images.unique().tolist()) == {0, value}
    assert not set(bundle.train.canvases.images.unique().tolist()) & {100}  # no test item in a train canvas
    # eval: the canvas in [0, 1], not normalised, every box with "iscrowd"
    image, target = bundle.val[0]
    assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor
    torch.testing.assert_close(image, bundle.val.canvases.images[0].float() / 255)
    kept = bundle.val.kept[0]
    assert torch.equal(target["boxes"], bundle.val.boxes[0][kept]) and target["boxes"].dtype == torch.float32
    assert torch.equal(target["labels"], bundle.val.labels[0][kept]) and target["labels"].dtype == torch.int64
    assert target["iscrowd"].dtype == torch.int64 and target["image_id"] == 0
    assert set(target) == {"boxes", "labels", "image_id", "iscrowd"}
    image, target = bundle.train[0]
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert set(target) == {"boxes", "labels", "image_id"}
    # the canvases depend on canvas_seed only; eval rebuilds the same val set; --input-size sets the model size
    again = build_datasets(cfg, need_train=False)
    assert again.train is None and torch.equal(again.val.boxes, bundle.val.boxes)
    other = build_datasets(DataConfig(**{**cfg.__dict__, "canvas_seed": 1}), need_train=False)
    assert not torch.equal(other.val.canvases.images, bundle.val.canvases.images)
    sized = build_datasets(DataConfig(**{**cfg.__dict__, "input_size": 96}), need_train=False)
    assert sized.model_defaults["size"] == 96 and sized.preprocessing.input_size == 96
    # a checkpoint's preprocessing is followed, and its channel count checked
    followed = build_datasets(cfg, need_train=False, preprocessing=bundle.preprocessing.replace(input_size=160))
    assert followed.model_defaults["size"] == 160
    with pytest.raises(UserError, match="3-channel"):
        build_datasets(cfg, need_train=False, preprocessing=Preprocessing())


def test_real_fashion_mnist_det_val_boxes():
    """On the real data when it is installed: every labelled pixel of the val canvases lies in a box of its
    class, and the boxes are tight (each box edge touches a pixel of its class)."""
    try:
        files = fashion_mnist.locate(download=False)
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    dataset = detection.fashion_mnist_boxes("val", 100, 0, files[fashion_mnist.FILES["test"][0]].parent)
    assert dataset.source == "test" and dataset.canvases.items.max() < fashion_mnist.TEST_SAMPLES
    for index in range(len(dataset)):
        _, target = dataset.load(index)
        mask = dataset.canvases.masks[index]
        inside = torch.zeros_like(mask, dtype=torch.bool)
        for (x0, y0, x1, y1), label in zip(target["boxes"].long().tolist(), target["labels"].tolist()):
            own = mask[y0:y1, x0:x1] == label
            assert own[0].any() and own[-1].any() and own[:, 0].any() and own[:, -1].any()
            inside[y0:y1, x0:x1] = True
        assert not (mask > 0)[~inside].any()


# --- transforms -----------------------------------------------------------------------------------------------

#: a 1-channel 60x80 image with three rectangles of their own values (distinct from the zoom-out fill)
RECTS = {1: ((5, 8, 25, 30), 200), 2: ((40, 10, 70, 24), 150), 3: ((30, 35, 52, 58), 90)}
PREP = Preprocessing(input_size=64, crop_pct=1.0, mean=(0.2,), std=(0.5,), in_chans=1)


def _rectangles() -> tuple[torch.Tensor, dict]:
    image = torch.zeros(1, 60, 80, dtype=torch.uint8)
    for (x0, y0, x1, y1), value in RECTS.values():
        image[:, y0:y1, x0:x1] = value
    target = {"boxes": tv_tensors.BoundingBoxes([box for box, _ in RECTS.values()], format="XYXY",
                                                canvas_size=(60, 80), dtype=torch.float32),
              "labels": torch.tensor(list(RECTS)), "iscrowd": torch.tensor([0, 0, 1]), "image_id": 7}
    return image, target


def test_train_transform_moves_boxes_with_their_pixels():
    """Zoom-out, IoU crop, flip: every output box lies inside the image and holds exactly its rectangle's pixels
    (pixels of that value are there and nowhere else); crowd boxes are dropped; flips go both ways."""
    transform = detection_train_transform(DataConfig(det_photometric=0.0), PREP)
    image, target = _rectangles()
    flipped, sizes = set(), set()
    for seed in range(60):
        torch.manual_seed(seed)
        out, out_target = transform(image, target)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape[0] == 1
        assert set(out_target) == {"boxes", "labels", "image_id"} and out_target["image_id"] == 7
        boxes, labels = out_target["boxes"], out_target["labels"]
        assert type(boxes) is torch.Tensor and boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert 3 not in labels.tolist()  # the crowd box never trains
        height, width = out.shape[-2:]
        sizes.add((height, width))
        assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()
        pixels = (out[0] * 255).round().to(torch.uint8)
        for box, label in zip(boxes.tolist(), labels.tolist()):
            assert box == [round(v) for v in box]  # no resize: whole pixels
            x0, y0, x1, y1 = (int(v) for v in box)
            here = pixels == RECTS[label][1]
            assert here[y0:y1, x0:x1].all() and here.sum() == (x1 - x0) * (y1 - y0), (seed, label)
            if label == 1 and (height, width) == (60, 80):  # not zoomed or cropped: left or mirrored to the right
                flipped.add(x0 != 5)
    assert flipped == {True, False} and len(sizes) > 10  # both flips, and zoom-outs and crops of many sizes


def test_zoom_out_fills_with_the_mean_and_photometric_works_on_grey_and_rgb():
    image, target = _rectangles()
    fill = round(255 * PREP.mean[0])
    values = {0, fill, *(value for _, value in RECTS.values())}
    zoom = detection_train_transform(DataConfig(det_photometric=0.0, det_zoom_out=4.0), PREP)
    distort = detection_train_transform(DataConfig(det_photometric=1.0, det_zoom_out=4.0), PREP)
    filled = changed = 0
    for seed in range(30):
        torch.manual_seed(seed)
        pixels = set((zoom(image, target)[0] * 255).round().to(torch.uint8).unique().tolist())
        assert pixels <= values  # padding writes the mean, nothing else changes a value
        filled += fill in pixels
        torch.manual_seed(seed)
        out, _ = distort(image, target)
        assert 0 <= out.min() and out.max() <= 1
        changed += not set((out * 255).round().to(torch.uint8).unique().tolist()) <= values
    assert filled > 3 and changed > 5
    rgb = detection_train_transform(DataConfig(det_photometric=1.0), detection_preprocessing(64))
    colour = torch.stack([image[0], image[0] // 2, 255 - image[0]])  # saturation and hue matter here
    for seed in range(3):
        torch.manual_seed(seed)
        out, _ = rgb(colour, target)
        assert out.shape[0] == 3 and 0 <= out.min() and out.max() <= 1
    # no zoom-out and no photometric distortion: only IoU crop and flip (torchvision's "ssdlite" policy)
    plain = detection_train_transform(DataConfig(det_photometric=0.0, det_zoom_out=1.0), PREP)
    assert [type(step).__name__ for step in plain.steps.transforms] == [
        "RandomIoUCrop", "RandomHorizontalFlip", "ToDtype", "SanitizeBoundingBoxes"]


def test_eval_transform_keeps_everything_and_negatives_train():
    image, target = _rectangles()
    out, out_target = detection_eval_transform()(image, target)
    torch.testing.assert_close(out, image.float() / 255)
    assert torch.equal(out_target["boxes"], target["boxes"].as_subclass(torch.Tensor))
    assert out_target["labels"].tolist() == [1, 2, 3] and out_target["iscrowd"].tolist() == [0, 0, 1]
    empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(60, 80)),
             "labels": torch.zeros(0, dtype=torch.int64), "image_id": 1}
    torch.manual_seed(0)
    out, out_target = detection_train_transform(DataConfig(), PREP)(image, empty)
    assert out_target["boxes"].shape == (0, 4) and out_target["labels"].shape == (0,)


def test_seeded_train_items_repeat_for_the_same_seed_epoch_and_index(fake_fashion):
    cfg = DataConfig(dataset="fashion-mnist-det", data_dir=str(fake_fashion), canvas_train_samples=8,
                     canvas_val_samples=2)
    train = SeededSamples(build_datasets(cfg).train)
    keys = [(index, sample_seed(3, epoch, index)) for epoch in (0, 1) for index in (0, 5)]
    first = train.__getitems__(keys)
    torch.manual_seed(123)  # the caller's generator state does not matter
    again = [train[key] for key in reversed(keys)][::-1]
    for (image, target), (image2, target2) in zip(first, again):
        assert torch.equal(image, image2)
        assert torch.equal(target["boxes"], target2["boxes"]) and torch.equal(target["labels"], target2["labels"])
    assert not torch.equal(first[0][0], first[2][0]) or not torch.equal(first[0][1]["boxes"], first[2][1]["boxes"])


def test_collate_gives_lists_and_counts_skipped():
    image, target = _rectangles()
    item = detection_eval_transform()(image, target)
    images, targets, skipped = collate_skipping([item, None, item])
    assert isinstance(images, list) and isinstance(targets, list) and skipped == 1
    assert len(images) == 2 and images[0] is item[0] and targets[1] is item[1]
    images, targets, skipped = collate_skipping([None, None])
    assert len(images) == 0 and len(targets) == 0 and skipped == 2
    # classification is unchanged
    images, labels, skipped = collate_skipping([(torch.zeros(1, 4, 4), 3), None])
    assert images.shape == (1, 1, 4, 4) and labels.tolist() == [3] and skipped == 1


@pytest.mark.parametrize("key, value", [("det_photometric", -0.1), ("det_photometric", 1.5), ("det_zoom_out", 0.5),
                                        ("det_zoom_out", 9.0)])
def test_detection_settings_are_checked(key, value):
    with pytest.raises(UserError, match=f"data.{key}"):
        check_data_config(DataConfig(**{key: value}))


# --- COCO-format folders -----------------------------------------------------------------------------------------

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 5, "name": "bird"}]


def _coco_folder(root: Path, split: str = "val", images_name: str | None = None, annotations_name: str | None = None,
                 categories=CATEGORIES) -> Path:
    """Three 40x30 images: a.png with two boxes and a crowd box, b.png without annotations, c.png corrupt."""
    images_dir = root / (images_name or split)
    images_dir.mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    for name, value in (("a.png", 50), ("b.png", 120)):
        Image.fromarray(np.full((30, 40, 3), value, dtype=np.uint8)).save(images_dir / name)
    (images_dir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    data = {
        "images": [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 4, "file_name": "b.png", "width": 40, "height": 30},
                   {"id": 22, "file_name": "c.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 5], "iscrowd": 0},
                        {"id": 2, "image_id": 10, "category_id": 5, "bbox": [20.5, 4, 8, 12]},
                        {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1},
                        {"id": 4, "image_id": 22, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}],
        "categories": categories,
    }
    path = root / "annotations" / (annotations_name or f"instances_{split}.json")
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@needs_pycocotools
def test_coco_folder_labels_are_category_ids(tmp_path, caplog):
    for split in ("train", "val"):
        _coco_folder(tmp_path, split)
    bundle = build_datasets(DataConfig(dataset=f"coco:{tmp_path}"))
    assert (bundle.task, bundle.num_classes, bundle.in_chans) == ("detection", 6, 3)
    assert bundle.class_names == ["__background__", "cat", "N/A", "dog", "N/A", "bird"]
    assert bundle.preprocessing == Preprocessing(input_size=320, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert bundle.model_defaults == {"size": 320, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    val = bundle.val
    assert len(val) == 3 and val.ids == [4, 10, 22]  # ascending image ids, as CocoDetection
    negative, annotated = val[0], val[1]
    assert negative[1]["image_id"] == 4 and negative[1]["boxes"].shape == (0, 4)
    assert negative[1]["labels"].shape == negative[1]["iscrowd"].shape == (0,)
    image, target = annotated
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    torch.testing.assert_close(image, torch.full((3, 30, 40), 50 / 255))
    assert target["image_id"] == 10 and target["labels"].tolist() == [3, 5, 1]
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [20.5, 4, 28.5, 16], [0, 0, 40, 30]]  # xywh -> xyxy
    assert target["iscrowd"].tolist() == [0, 0, 1] and target["boxes"].dtype == torch.float32
    # a corrupt file: None, named once, counted by collate
    with caplog.at_level(logging.WARNING):
        assert val[2] is None and val[2] is None
    assert [r.getMessage() for r in caplog.records if "c.png" in r.getMessage()][0].startswith("skipping unreadable")
    assert len([r for r in caplog.records if "c.png" in r.getMessage()]) == 1 and len(val.broken_files) == 1
    images, targets, skipped = collate_skipping([val[i] for i in range(3)])
    assert len(images) == len(targets) == 2 and skipped == 1
    # training: never a crowd box
    for seed in range(10):
        torch.manual_seed(seed)
        _, train_target = bundle.train[1]
        assert 1 not in train_target["labels"].tolist() and "iscrowd" not in train_target
    # the folder is recognised without "coco:", and pickles (DataLoader workers under spawn)
    plain = build_datasets(DataConfig(dataset=str(tmp_path)), need_train=False)
    assert plain.train is None and plain.class_names == bundle.class_names
    copied = pickle.loads(pickle.dumps(plain.val))
    assert copied[1][1]["labels"].tolist() == [3, 5, 1]
    with pytest.raises(UserError, match="unreadable image .*c.png"):
        build_datasets(DataConfig(dataset=str(tmp_path), strict_data=True), need_train=False).val[2]


@needs_pycocotools
def test_coco_2017_names_and_a_checkpoints_input_size(tmp_path):
    _coco_folder(tmp_path, images_name="val2017", annotations_name="instances_val2017.json")
    bundle = build_datasets(DataConfig(dataset=str(tmp_path)), need_train=False,
                            preprocessing=detection_preprocessing(512))
    assert bundle.val.image_dir == tmp_path / "val2017" and bundle.model_defaults["size"] == 512
    assert bundle.val[1][1]["labels"].tolist() == [3, 5, 1]
    with pytest.raises(UserError, match="instances_train"):  # training needs the train pair too
        build_datasets(DataConfig(dataset=f"coco:{tmp_path}"))


def detection_preprocessing(size: int) -> Preprocessing:
    return Preprocessing(input_size=size, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _set(key: str, index: int, **values):
    """A `breaks` that sets `values` in entry `index` of the file's `key` list ("images" or "annotations")."""
    return lambda path: _edit(path, lambda data: data[key][index].update(values))


@needs_pycocotools
@pytest.mark.parametrize("breaks, message", [
    (lambda path: path.write_text("{not json", encoding="utf-8"), "not valid JSON"),
    (lambda path: path.unlink(), "no COCO-format annotations"),
    (lambda path: _edit(path, lambda d: d["categories"].append({"id": 0, "name": "thing"})), "'thing' has id 0"),
    (lambda path: _edit(path, lambda d: d["annotations"][0].update(category_id=7)), r"annotations\[0\].*category_id 7"),
    (lambda path: _edit(path, lambda d: d["annotations"][1].pop("bbox")), r"annotations\[1\] needs"),
    (lambda path: _edit(path, lambda d: d.update(categories=[])), "names no categories"),
    (lambda path: path.write_text("[1, 2]", encoding="utf-8"), "not a COCO instances file"),
    # ids must be integers (a JSON true is not one), image ids unique, iscrowd 0 or 1
    (_set("annotations", 0, category_id=[1]), r"annotations\[0\] has category_id \[1\]; expected an integer"),
    (_set("annotations", 2, category_id=True), r"annotations\[2\] has category_id True; expected an integer"),
    (_set("images", 1, id=[1]), r"images\[1\] has id \[1\]; expected an integer"),
    (_set("images", 0, id="10"), r"images\[0\] has id '10'; expected an integer"),
    (_set("images", 2, id=10), r"images\[2\] repeats image id 10 \(of images\[0\]\)"),
    (_set("annotations", 1, image_id=[10]), r"annotations\[1\] has image_id \[10\]; expected an integer"),
    (_set("annotations", 3, id=4.0), r"annotations\[3\] has id 4.0; expected an integer"),
    (_set("annotations", 3, id=1), r"annotations\[3\] repeats annotation id 1"),
    (_set("annotations", 0, iscrowd="no"), r"annotations\[0\] has iscrowd 'no'; expected 0 or 1"),
    (_set("annotations", 2, iscrowd=2), r"annotations\[2\] has iscrowd 2; expected 0 or 1"),
    (_set("annotations", 2, iscrowd=True), r"annotations\[2\] has iscrowd True; expected 0 or 1"),
])
def test_broken_coco_annotations_give_one_line_naming_the_file(tmp_path, breaks, message):
    path = _coco_folder(tmp_path)
    breaks(path)
    with pytest.raises(UserError, match=message) as error:
        build_datasets(DataConfig(dataset=f"coco:{tmp_path}"), need_train=False)
    text = str(error.value)
    assert "\n" not in text and str(path if path.exists() else tmp_path) in text  # the file, or its folder


@needs_pycocotools
def test_coco_train_and_val_must_name_the_same_categories(tmp_path):
    _coco_folder(tmp_path, "train", categories=[{"id": 1, "name": "cat"}, {"id": 3, "name": "wolf"},
                                                {"id": 5, "name": "bird"}])
    _coco_folder(tmp_path, "val")
    with pytest.raises(UserError, match="different categories .*id 3: 'wolf' against 'dog'"):
        build_datasets(DataConfig(dataset=str(tmp_path)))
    with pytest.raises(UserError, match="no COCO-format annotations"):
        build_datasets(DataConfig(dataset=f"coco:{tmp_path / 'elsewhere'}"))


def test_missing_pycocotools_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    """Without pycocotools (looked up through importlib.util.find_spec): one line that says how to install it,
    both from `require_pycocotools` and from reading a COCO-format folder."""
    _coco_folder(tmp_path)
    find_spec = importlib.util.find_spec

    def without_pycocotools(name, *rest, **kwargs):
        return None if name == "pycocotools" else find_spec(name, *rest, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_pycocotools)  # data/detection.py looks it up there
    expected = "reading COCO-format annotations needs pycocotools: " + detection.PYCOCOTOOLS_HINT
    assert detection.PYCOCOTOOLS_HINT == "pip install pycocotools (or pip install 'mobilenetv3[detection]')"
    with pytest.raises(UserError) as error:
        detection.require_pycocotools("reading COCO-format annotations")
    assert str(error.value) == expected
    with pytest.raises(UserError) as error:
        build_datasets(DataConfig(dataset=f"coco:{tmp_path}"), need_train=False)
    assert str(error.value) == expected and "\n" not in str(error.value)
    monkeypatch.undo()
    if find_spec("pycocotools") is not None:
        detection.require_pycocotools("anything")  # installed: no error
