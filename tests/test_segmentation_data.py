"""Segmentation data: masks move with their images, bad masks are named, VOC and fashion-mnist-seg canvases."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv3 import Preprocessing, UserError
from mobilenetv3.data import DataConfig, build_datasets, check_data_config, collate_skipping
from mobilenetv3.data import fashion_mnist, segmentation
from mobilenetv3.data.samplers import SeededSamples
from mobilenetv3.data.transforms import IGNORE_INDEX, segmentation_eval_transform, segmentation_train_transform

SIZE = 16  # crop size of the folder tests: tiny, for 2 shared CPU cores
PREP = Preprocessing(input_size=SIZE, crop_pct=1.0, mean=(0.25,), std=(0.5,), in_chans=1)
RECT_CLASS, RECT_VALUE = 3, 200


def _normalised(value: int) -> float:
    return (value / 255 - PREP.mean[0]) / PREP.std[0]


def _is(image: torch.Tensor, value: int) -> torch.Tensor:
    """Where a normalised image holds the uint8 `value` (within float32 rounding)."""
    return torch.isclose(image, torch.tensor(_normalised(value)), rtol=0, atol=1e-5)


def _rectangle_canvas(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A black image with an off-centre rectangle of RECT_VALUE and the mask labelling it RECT_CLASS (0 elsewhere)."""
    image = torch.zeros(1, height, width, dtype=torch.uint8)
    mask = torch.zeros(height, width, dtype=torch.uint8)
    image[:, 3:11, 2:7] = RECT_VALUE
    mask[3:11, 2:7] = RECT_CLASS
    return image, mask


# --- transforms ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.5, 2.0)])
def test_train_transform_keeps_the_mask_on_its_image(scale):
    """Random scale (nearest, so both are resized alike), crop and flip: the mask's class-k pixels are exactly
    where the image's rectangle is, for every draw, and both flipped and unflipped draws happen."""
    cfg = DataConfig(interpolation="nearest", seg_scale_min=scale[0], seg_scale_max=scale[1])
    transform = segmentation_train_transform(cfg, PREP)
    image, mask = _rectangle_canvas(SIZE, SIZE + 9)
    flipped = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (1, SIZE, SIZE) and out_image.dtype == torch.float32
        assert out_mask.shape == (SIZE, SIZE) and out_mask.dtype == torch.int64
        assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor  # plain tensors, not tv_tensors
        rect = _is(out_image[0], RECT_VALUE)
        assert torch.equal(out_mask == RECT_CLASS, rect), seed
        assert torch.equal(out_mask == 0, _is(out_image[0], 0)), seed
        assert set(out_mask.unique().tolist()) <= {0, RECT_CLASS, IGNORE_INDEX}
        columns = rect.any(0).nonzero()
        if len(columns) and scale == (1.0, 1.0):  # a 5-wide rectangle 2 from the left, or mirrored
            flipped.add(bool(columns.min() > SIZE - 1 - int(columns.max())))
    if scale == (1.0, 1.0):
        assert flipped == {True, False}


def test_train_padding_marks_the_mask_ignored():
    """An image smaller than the crop is padded: 255 in the mask, the image's mean (0 once normalised) in the image."""
    cfg = DataConfig(seg_scale_min=0.5, seg_scale_max=0.5, hflip=0.0)
    transform = segmentation_train_transform(cfg, PREP)
    image = torch.full((1, SIZE, SIZE), RECT_VALUE, dtype=torch.uint8)
    mask = torch.full((SIZE, SIZE), 2, dtype=torch.uint8)
    torch.manual_seed(0)
    out_image, out_mask = transform(image, mask)
    ignored = out_mask == IGNORE_INDEX
    assert int(ignored.sum()) == SIZE * SIZE - (SIZE // 2) ** 2  # the image shrank to 8x8
    assert torch.equal(ignored | (out_mask == 2), torch.ones_like(ignored))
    assert torch.equal(_is(out_image[0], RECT_VALUE), ~ignored)
    fill = round(255 * PREP.mean[0])
    torch.testing.assert_close(out_image[0][ignored], torch.full((int(ignored.sum()),), _normalised(fill)))


def test_eval_transform_resizes_short_side_with_nearest_masks():
    image, mask = _rectangle_canvas(2 * SIZE, 3 * SIZE)
    out_image, out_mask = segmentation_eval_transform(PREP)(image, mask)
    assert out_image.shape == (1, SIZE, SIZE * 3 // 2) and out_mask.shape == (SIZE, SIZE * 3 // 2)
    assert set(out_mask.unique().tolist()) == {0, RECT_CLASS}  # nearest: no blended labels
    same_image, same_mask = segmentation_eval_transform(PREP)(*_rectangle_canvas(SIZE, SIZE))
    assert torch.equal(same_mask, _rectangle_canvas(SIZE, SIZE)[1].long())  # already at size: unchanged
    assert torch.equal(_is(same_image[0], RECT_VALUE), same_mask == RECT_CLASS)


def test_collate_pads_masks_with_ignore_and_counts_skipped():
    small = (torch.ones(1, 2, 3), torch.full((2, 3), 1))
    large = (torch.ones(1, 4, 2), torch.full((4, 2), 2))
    images, masks, skipped = collate_skipping([small, None, large])
    assert skipped == 1 and images.shape == (2, 1, 4, 3) and masks.shape == (2, 4, 3) and masks.dtype == torch.int64
    assert masks[0].tolist() == [[1, 1, 1], [1, 1, 1], [255, 255, 255], [255, 255, 255]]
    assert masks[1].tolist() == [[2, 2, 255]] * 4
    assert images[0, 0, 2:].eq(0).all() and images[1, 0, :, 2].eq(0).all() and images[0, 0, :2].eq(1).all()


# --- folders ---------------------------------------------------------------------------------------------------


def _write_pair(split_dir: Path, stem: str, image: np.ndarray, mask: np.ndarray, ext: str = ".png") -> None:
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(split_dir / "images" / f"{stem}{ext}")
    Image.fromarray(mask).save(split_dir / "masks" / f"{stem}.png")


@pytest.fixture
def seg_root(tmp_path: Path) -> Path:
    """train/ with two pairs (one a JPEG) and val/ with one; masks use classes 0..2 and 255; classes.txt names 3."""
    rng = np.random.default_rng(0)
    root = tmp_path / "seg"
    for split, stems in (("train", ("a", "b")), ("val", ("c",))):
        for index, stem in enumerate(stems):
            mask = rng.integers(0, 3, (20, 24), dtype=np.uint8)
            mask[0] = 255
            image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            _write_pair(root / split, stem, image, mask, ".jpg" if index else ".png")
    (root / "classes.txt").write_text("road\ncar\nsky\n\n")
    return root


def test_folder_loads_images_and_masks(seg_root):
    cfg = DataConfig(dataset=str(seg_root), input_size=SIZE)
    bundle = build_datasets(cfg)
    assert (bundle.task, bundle.ignore_index, bundle.in_chans) == ("segmentation", 255, 3)
    assert bundle.class_names == ["road", "car", "sky"] and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val)) == (2, 1) and "segmentation" in bundle.describe()
    assert bundle.preprocessing == Preprocessing(input_size=SIZE, crop_pct=1.0)
    image, mask = bundle.train[0]
    assert image.shape == (3, SIZE, SIZE) and mask.shape == (SIZE, SIZE) and mask.dtype == torch.int64
    stored = np.asarray(Image.open(seg_root / "val" / "masks" / "c.png"))
    loaded_image, loaded_mask = bundle.val.load(0)
    assert np.array_equal(loaded_mask.numpy(), stored) and loaded_image.shape == (3, 20, 24)
    image, mask = bundle.val[0]  # eval: short side resized to the input size, nothing cropped
    assert image.shape == (3, SIZE, 19) and mask.shape == (SIZE, 19)
    only_val = build_datasets(cfg, need_train=False)
    assert only_val.train is None and len(only_val.val) == 1


def test_folder_without_classes_txt_counts_classes_from_masks(seg_root):
    (seg_root / "classes.txt").unlink()
    bundle = build_datasets(DataConfig(dataset=str(seg_root), input_size=SIZE))
    assert bundle.num_classes == 3 and bundle.class_names == ["class_0", "class_1", "class_2"]


def test_a_checkpoints_classes_stand_in_for_a_missing_classes_txt(seg_root):
    # eval of a checkpoint: a validation split may lack the class training saw last, so the checkpoint's class
    # list wins over counting the masks (a mask past it is still refused); classes.txt wins over both
    (seg_root / "classes.txt").unlink()
    cfg = DataConfig(dataset=str(seg_root), input_size=SIZE)
    assert build_datasets(cfg).num_classes == 3
    bundle = build_datasets(cfg, need_train=False, class_names=["a", "b", "c", "d"])
    assert bundle.class_names == ["a", "b", "c", "d"] and bundle.val_batch_size == 1  # images keep their sizes
    with pytest.raises(UserError, match=r"c\.png"):
        build_datasets(cfg, need_train=False, class_names=["a", "b"]).val[0]


def test_folder_skips_and_names_broken_images(seg_root, caplog):
    (seg_root / "train" / "images" / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(seg_root / "train" / "masks" / "broken.png")
    bundle = build_datasets(DataConfig(dataset=str(seg_root), input_size=SIZE))
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    items = [bundle.train[index] for index in range(len(bundle.train))]
    images, masks, skipped = collate_skipping(items)
    assert skipped == 1 and images.shape == (2, 3, SIZE, SIZE) and masks.shape == (2, SIZE, SIZE)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and str(seg_root / "train" / "images" / "broken.png") in warnings[0]
    strict = build_datasets(DataConfig(dataset=str(seg_root), input_size=SIZE, strict_data=True))
    with pytest.raises(UserError, match=r"unreadable image .*broken\.png"):
        [strict.train[index] for index in range(len(strict.train))]


def _break_missing(root: Path) -> tuple[Path, str]:
    mask = root / "train" / "masks" / "b.png"
    mask.unlink()
    return mask, r"missing mask .*b\.png for image .*b\.jpg"


def _break_size(root: Path) -> tuple[Path, str]:
    mask = root / "train" / "masks" / "a.png"
    Image.fromarray(np.zeros((20, 23), np.uint8)).save(mask)
    return mask, r"mask .*a\.png is 23x20 but its image .*a\.png is 24x20; they must be the same size"


def _break_value(root: Path) -> tuple[Path, str]:
    mask = root / "train" / "masks" / "a.png"
    values = np.zeros((20, 24), np.uint8)
    values[5, 5], values[0] = 7, 255
    Image.fromarray(values).save(mask)
    return mask, r"mask .*a\.png has class index 7 but the data has 3 classes \(0\.\.2; 255 = ignore\)"


def _break_mode(root: Path) -> tuple[Path, str]:
    mask = root / "train" / "masks" / "a.png"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(mask)
    return mask, r"mask .*a\.png has mode RGB; masks are single-channel"


@pytest.mark.parametrize("breaks", [_break_missing, _break_size, _break_value, _break_mode])
def test_bad_masks_give_one_line_naming_the_file(seg_root, breaks):
    path, message = breaks(seg_root)
    with pytest.raises(UserError, match=message) as caught:
        bundle = build_datasets(DataConfig(dataset=str(seg_root), input_size=SIZE))
        [bundle.train[index] for index in range(len(bundle.train))]
    text = str(caught.value)
    assert "\n" not in text and str(path) in text


def test_bad_classes_txt_and_settings_are_named(seg_root):
    (seg_root / "classes.txt").write_text("road\n\nsky\n")
    with pytest.raises(UserError, match=r"classes\.txt line 2 is empty"):
        build_datasets(DataConfig(dataset=str(seg_root)))
    (seg_root / "classes.txt").write_text("road\ncar\nroad\n")
    with pytest.raises(UserError, match=r"classes\.txt names 'road' on lines 1 and 3 \(each class once\)"):
        build_datasets(DataConfig(dataset=str(seg_root)))
    with pytest.raises(UserError, match="data.seg_scale_min must be > 0 and <= data.seg_scale_max, got 2.0 and 1.0"):
        check_data_config(DataConfig(seg_scale_min=2.0, seg_scale_max=1.0))
    with pytest.raises(UserError, match="data.canvas_train_samples must be >= 1, got 0"):
        check_data_config(DataConfig(canvas_train_samples=0))


def test_seeded_samples_reproduce_segmentation_items(seg_root):
    """Augmentation draws from torch's RNG, so SeededSamples fixes each (index, seed)'s crop and flip."""
    seeded = SeededSamples(build_datasets(DataConfig(dataset=str(seg_root), input_size=SIZE)).train)
    first, again, other = seeded[(1, 11)], seeded[(1, 11)], seeded[(1, 12)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


# --- Pascal VOC ------------------------------------------------------------------------------------------------


def _fake_voc(parent: Path) -> Path:
    """VOCdevkit/VOC2012 with 2 train and 1 val images and palette masks (VOC's own format: P mode, 255 borders)."""
    voc = parent / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    names = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    rng = np.random.default_rng(1)
    for split, stems in names.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in stems))
        for stem in stems:
            Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
            indices = rng.choice(np.array([0, 15, 20, 255], np.uint8), (18, 22))
            mask = Image.frombytes("P", (22, 18), indices.tobytes())
            mask.putpalette([value for index in range(256) for value in (index, 0, 0)])
            mask.save(voc / "SegmentationClass" / f"{stem}.png")
    return parent


def test_fake_voc_tree_loads(tmp_path):
    parent = _fake_voc(tmp_path / "data")
    for value in (f"voc:{parent}", str(parent), f"voc:{parent / 'VOCdevkit'}"):
        bundle = build_datasets(DataConfig(dataset=value, input_size=SIZE))
        assert bundle.class_names == segmentation.VOC_CLASSES and bundle.num_classes == 21
        assert (bundle.task, bundle.ignore_index, len(bundle.train), len(bundle.val)) == ("segmentation", 255, 2, 1)
    image, mask = bundle.train[0]
    assert image.shape == (3, SIZE, SIZE) and set(mask.unique().tolist()) <= {0, 15, 20, 255}
    raw_image, raw_mask = bundle.val.load(0)
    assert raw_image.shape == (3, 18, 22) and set(raw_mask.unique().tolist()) == {0, 15, 20, 255}
    with pytest.raises(UserError, match=r"no Pascal VOC 2012 under .*nowhere"):
        build_datasets(DataConfig(dataset=f"voc:{tmp_path / 'nowhere'}"))
    (parent / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(UserError, match=r"cannot read Pascal VOC 2012's val list"):
        build_datasets(DataConfig(dataset=f"voc:{parent}"))


# --- fashion-mnist-seg canvases --------------------------------------------------------------------------------


def _items(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob-like 28x28 items (a bright random square on black, faint noise around) and labels 0..9."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 15, (count, 28, 28), dtype=np.uint8)
    for index in range(count):
        top, left = rng.integers(2, 12, 2)
        items[index, top:top + 14, left:left + 12] = rng.integers(60, 256)
    return torch.from_numpy(items), torch.from_numpy(np.arange(count) % 10)


def test_canvases_are_deterministic_from_the_seed():
    items, labels = _items(50)
    first, again = segmentation.make_canvases(items, labels, 20, 3), segmentation.make_canvases(items, labels, 20, 3)
    for name in ("images", "masks", "items", "boxes"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    other = segmentation.make_canvases(items, labels, 20, 4)
    assert not torch.equal(first.images, other.images) and not torch.equal(first.items, other.items)
    assert first.images.shape == (20, 1, 128, 128) and first.masks.shape == (20, 128, 128)
    assert first.images.dtype == first.masks.dtype == torch.uint8


def test_canvas_masks_match_bright_pixels_and_item_classes():
    items, labels = _items(40)
    canvases = segmentation.make_canvases(items, labels, 30, 0)
    bright = canvases.images[:, 0] > segmentation.CANVAS_THRESHOLD
    assert torch.equal(canvases.masks > 0, bright)  # every labelled pixel is bright, every bright pixel labelled
    counts = (canvases.items >= 0).sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and set(counts.tolist()) == {1, 2, 3, 4}
    sides = canvases.boxes[..., 2] - canvases.boxes[..., 0]
    used = canvases.items >= 0
    assert sides[used].min() >= 42 and sides[used].max() <= 84 and canvases.boxes[used].max() <= 128
    for index in range(len(canvases.items)):
        chosen = canvases.items[index][canvases.items[index] >= 0]
        present = set(canvases.masks[index].unique().tolist()) - {0}
        assert present <= set((labels[chosen] + 1).tolist())
        top = int(chosen[-1])  # the last item drawn is on top: its own bright pixels show it and its class
        x0, y0, x1, y1 = canvases.boxes[index, len(chosen) - 1].tolist()
        scaled = torch.nn.functional.interpolate(items[top][None, None].float(), size=(y1 - y0, x1 - x0),
                                                 mode="bilinear", align_corners=False)[0, 0]
        scaled = (scaled + 0.5).to(torch.uint8)
        own = scaled > segmentation.CANVAS_THRESHOLD
        assert own.any()
        assert (canvases.masks[index, y0:y1, x0:x1][own] == labels[top] + 1).all()
        assert torch.equal(canvases.images[index, 0, y0:y1, x0:x1][own], scaled[own])


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


def test_fashion_mnist_seg_train_canvases_use_train_items_only(fake_fashion):
    cfg = DataConfig(dataset="fashion-mnist-seg", data_dir=str(fake_fashion), canvas_train_samples=12,
                     canvas_val_samples=5)
    bundle = build_datasets(cfg)
    assert bundle.class_names == segmentation.CANVAS_CLASSES and bundle.num_classes == 11
    assert bundle.class_names[:2] == ["background", "T-shirt/top"]
    assert (bundle.task, bundle.ignore_index, bundle.in_chans, bundle.model_defaults) == (
        "segmentation", 255, 1, {"in_chans": 1})
    assert bundle.preprocessing == Preprocessing(input_size=128, crop_pct=1.0, mean=segmentation.CANVAS_MEAN,
                                                 std=segmentation.CANVAS_STD, in_chans=1)
    for dataset, source, value, count in ((bundle.train, "train", 200, 30), (bundle.val, "test", 100, 20)):
        canvases = dataset.canvases
        assert dataset.source == source
        assert canvases.items.max() < count and set(canvases.images.unique().tolist()) == {0, value}
    image, mask = bundle.val[0]  # eval: identity at 128 + normalise
    expected = (bundle.val.canvases.images[0].float() / 255 - segmentation.CANVAS_MEAN[0]) / segmentation.CANVAS_STD[0]
    torch.testing.assert_close(image, expected)
    assert torch.equal(mask, bundle.val.canvases.masks[0].long())
    image, mask = bundle.train[0]
    assert image.shape == (1, 128, 128) and mask.shape == (128, 128) and mask.dtype == torch.int64
    # the canvases do not depend on the run, only on canvas_seed: eval rebuilds the same val canvases
    again = build_datasets(cfg, need_train=False)
    assert again.train is None and torch.equal(again.val.canvases.images, bundle.val.canvases.images)


def test_canvases_written_as_a_folder_read_back_the_same(fake_fashion, tmp_path):
    cfg = DataConfig(dataset="fashion-mnist-seg", data_dir=str(fake_fashion), canvas_train_samples=3,
                     canvas_val_samples=2)
    bundle = build_datasets(cfg)
    root = segmentation.write_folder(tmp_path / "written", {"train": bundle.train, "val": bundle.val},
                                     bundle.class_names)
    folder = build_datasets(DataConfig(dataset=str(root), input_size=128))
    assert folder.class_names == bundle.class_names and len(folder.train) == 3 and len(folder.val) == 2
    folder_l = build_datasets(DataConfig(dataset=str(root)), preprocessing=bundle.preprocessing)
    assert folder_l.in_chans == 1 and folder_l.model_defaults == {"in_chans": 1}
    for index in range(2):
        image, mask = folder_l.val.load(index)
        assert torch.equal(image, bundle.val.canvases.images[index])
        assert torch.equal(mask, bundle.val.canvases.masks[index])


def test_real_fashion_mnist_seg_val_canvases():
    """On the real data when it is installed: the val canvases come from the 10000 test items."""
    try:
        files = fashion_mnist.locate(download=False)
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    dataset = segmentation.fashion_mnist_canvases("val", 200, 0, files[fashion_mnist.FILES["test"][0]].parent)
    canvases = dataset.canvases
    assert canvases.items.max() < fashion_mnist.TEST_SAMPLES and dataset.source == "test"
    assert torch.equal(canvases.masks > 0, canvases.images[:, 0] > segmentation.CANVAS_THRESHOLD)
    assert set(canvases.masks.unique().tolist()) == set(range(11))
    pixels = canvases.images.float() / 255  # the val canvases' statistics are close to the train canvases'
    assert abs(pixels.mean() - segmentation.CANVAS_MEAN[0]) < 0.01
    assert abs(pixels.std() - segmentation.CANVAS_STD[0]) < 0.01
