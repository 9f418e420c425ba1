"""The data package: tolerant ImageFolder, Fashion-MNIST discovery and reading, synthetic data, collate_skipping."""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mobilenetv3 import Preprocessing, UserError
from mobilenetv3.data import DataConfig, build_datasets, check_data_config, collate_skipping
from mobilenetv3.data import fashion_mnist
from mobilenetv3.data.folder import TolerantImageFolder

SIZE = 16  # crop size used throughout: tiny, for 2 shared CPU cores
RNG = np.random.default_rng(0)


def _pixels(height=20, width=24, channels=3) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _open(path) -> Image.Image:
    """A decoded image, with its file closed."""
    with Image.open(path) as image:
        image.load()
        return image


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


GOOD_FILES = {  # name -> (mode written, PIL image factory)
    "rgb.jpg": lambda: Image.fromarray(_pixels()),
    "grey.png": lambda: Image.fromarray(_pixels()[..., 0], mode="L"),
    "alpha.png": lambda: Image.fromarray(_pixels(channels=4), mode="RGBA"),
    "palette.png": lambda: Image.fromarray(_pixels()).convert("P"),
    "cmyk.jpg": lambda: Image.fromarray(_pixels(channels=4), mode="CMYK"),
    "deep.png": lambda: Image.fromarray(_pixels()[..., 0].astype(np.uint16) * 257),  # 16-bit grey, "I;16"
}
BROKEN_FILES = ("truncated.jpg", "empty.jpg", "text.jpg")


def _write_broken(folder: Path) -> None:
    good = _save(folder / "whole.tmp.jpg", Image.fromarray(_pixels(64, 64)), format="JPEG")
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """train/{cat,dog} and val/{cat,dog}; train/cat holds every image mode plus three broken files."""
    root = tmp_path / "images"
    for name, make in GOOD_FILES.items():
        _save(root / "train" / "cat" / name, make())
    _write_broken(root / "train" / "cat")
    (root / "train" / "cat" / "notes.txt").write_text("not an image extension: ignored")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    for split in ("train", "val"):
        _save(root / split / "dog" / "dog.png", Image.fromarray(_pixels()))
    _save(root / "val" / "cat" / "cat.jpg", Image.fromarray(_pixels()))
    return root


def _folder_config(root: Path, **changes) -> DataConfig:
    return DataConfig(dataset=str(root), input_size=SIZE, crop_pct=1.0, **changes)


def _index_of(dataset: TolerantImageFolder, name: str) -> int:
    return next(i for i, (path, _) in enumerate(dataset.samples) if Path(path).name == name)


# --- ImageNet-layout folder ------------------------------------------------------------------------------------


def test_folder_reads_every_mode_as_rgb(image_root):
    assert _open(image_root / "train" / "cat" / "deep.png").mode == "I;16"
    assert _open(image_root / "train" / "cat" / "cmyk.jpg").mode == "CMYK"
    bundle = build_datasets(_folder_config(image_root))
    assert bundle.class_names == ["cat", "dog"] and bundle.num_classes == 2 and bundle.in_chans == 3
    assert bundle.model_defaults == {}
    assert len(bundle.train) == len(GOOD_FILES) + len(BROKEN_FILES) + 1
    for name in GOOD_FILES:
        image, label = bundle.train[_index_of(bundle.train, name)]
        # uint8 pixels: the training loader normalises whole batches on the device (tests/test_folder_pipeline.py)
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8, name
        assert label == 0


def test_folder_converts_grey_and_16_bit_to_equal_rgb_channels(image_root):
    folder = TolerantImageFolder(image_root / "train", transform=None)
    grey = np.asarray(_open(image_root / "train" / "cat" / "grey.png"))
    converted = np.asarray(folder.read_image(str(image_root / "train" / "cat" / "grey.png")))
    assert converted.shape == grey.shape + (3,)
    for channel in range(3):
        np.testing.assert_array_equal(converted[..., channel], grey)
    # 16-bit values v * 257 come back as 8-bit v (scaled, not clipped to white)
    deep = np.asarray(_open(image_root / "train" / "cat" / "deep.png")).astype(np.int64) // 257
    converted = np.asarray(folder.read_image(str(image_root / "train" / "cat" / "deep.png"))).astype(np.int64)
    assert np.abs(converted[..., 0] - deep).max() <= 1 and converted.min() < 128 < converted.max()


def test_folder_val_uses_the_preprocessing_eval_transform(image_root):
    bundle = build_datasets(DataConfig(dataset=str(image_root), input_size=SIZE, crop_pct=0.8, interpolation="bicubic"))
    assert bundle.preprocessing == Preprocessing(input_size=SIZE, crop_pct=0.8, interpolation="bicubic")
    for index, (path, label) in enumerate(bundle.val.samples):
        expected = bundle.preprocessing.eval_transform()(_open(path))  # what `predict` does with a file
        image, got_label = bundle.val[index]
        assert got_label == label
        torch.testing.assert_close(image, expected, rtol=0, atol=0)


def test_broken_files_give_none_and_one_warning_each(image_root, caplog):
    bundle = build_datasets(_folder_config(image_root))
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    for name in BROKEN_FILES:
        index = _index_of(bundle.train, name)
        assert bundle.train[index] is None
        assert bundle.train[index] is None  # read twice, warned once
        warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(warnings) == 1 and str(image_root / "train" / "cat" / name) in warnings[0]
    reasons = {name: message for name in BROKEN_FILES for message in (r.getMessage() for r in caplog.records)
               if name in message}
    assert reasons["empty.jpg"].endswith(": empty file")
    assert reasons["text.jpg"].endswith(": not an image, or a format PIL can't read")
    assert "truncated" in reasons["truncated.jpg"].split(": ", 1)[1]
    assert {Path(p).name for p in bundle.train.broken_files} == set(BROKEN_FILES)


@pytest.mark.parametrize("name", BROKEN_FILES)
def test_strict_data_raises_naming_the_file(image_root, name):
    bundle = build_datasets(_folder_config(image_root, strict_data=True))
    with pytest.raises(UserError, match=r"unreadable image .*" + name.replace(".", r"\.")):
        bundle.train[_index_of(bundle.train, name)]


def test_collate_skipping_drops_and_counts_broken_items(image_root):
    bundle = build_datasets(_folder_config(image_root))
    loader = DataLoader(bundle.train, batch_size=4, shuffle=False, collate_fn=collate_skipping)
    kept, skipped, batch_sizes = 0, 0, []
    for images, targets, dropped in loader:
        assert images.shape[1:] == (3, SIZE, SIZE) and targets.dtype == torch.int64
        assert images.shape[0] == targets.shape[0]
        kept, skipped = kept + images.shape[0], skipped + dropped
        batch_sizes.append(images.shape[0] + dropped)
    assert (kept, skipped) == (len(GOOD_FILES) + 1, len(BROKEN_FILES))
    assert batch_sizes == [4, 4, 2]


def test_collate_skipping_of_only_broken_items():
    images, targets, skipped = collate_skipping([None, None])
    assert skipped == 2 and images.shape[0] == 0 and targets.shape == (0,) and targets.dtype == torch.int64
    images, targets, skipped = collate_skipping([(torch.ones(1, 2, 2), 3), None, (torch.zeros(1, 2, 2), 1)])
    assert skipped == 1 and images.shape == (2, 1, 2, 2) and targets.tolist() == [3, 1]


@pytest.mark.parametrize("auto_augment", [None, "autoaugment", "randaugment", "trivialaugment"])
def test_folder_train_transform_is_reproducible_from_the_torch_seed(image_root, auto_augment):
    bundle = build_datasets(_folder_config(image_root, auto_augment=auto_augment, random_erasing=0.5))
    index = _index_of(bundle.train, "rgb.jpg")
    samples = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        samples.append(torch.stack([bundle.train[index][0] for _ in range(4)]))
    assert samples[0].shape == (4, 3, SIZE, SIZE)
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)
    assert not torch.equal(samples[0], samples[2])


def test_missing_and_malformed_folders_are_one_line_errors(tmp_path, image_root):
    with pytest.raises(UserError, match="data folder not found: .*nowhere"):
        build_datasets(DataConfig(dataset=str(tmp_path / "nowhere")))
    (tmp_path / "list.txt").write_text("a file, not a folder")
    with pytest.raises(UserError, match=r"--data .*list\.txt is a file"):
        build_datasets(DataConfig(dataset=str(tmp_path / "list.txt")))
    shutil.rmtree(image_root / "val")
    with pytest.raises(UserError, match=r"has no val/ folder"):
        build_datasets(_folder_config(image_root))
    with pytest.raises(UserError, match=r"has no val/ folder"):
        build_datasets(_folder_config(image_root), need_train=False)
    shutil.rmtree(image_root / "train")
    with pytest.raises(UserError, match=r"has no train/ or val/ folder"):
        build_datasets(_folder_config(image_root))


def test_empty_class_folder_and_no_classes(image_root):
    (image_root / "val" / "bird").mkdir()
    (image_root / "val" / "bird" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"class folder with no images: .*val/bird"):
        build_datasets(_folder_config(image_root), need_train=False)
    for child in (image_root / "val").iterdir():
        shutil.rmtree(child)
    with pytest.raises(UserError, match=r"no class folders in .*val"):
        build_datasets(_folder_config(image_root), need_train=False)


def test_val_classes_must_equal_train_classes(image_root):
    shutil.move(image_root / "val" / "dog", image_root / "val" / "wolf")
    expected = r"val classes differ from train classes \(missing in .*: dog; not in .*: wolf\)"
    with pytest.raises(UserError, match=expected):
        build_datasets(_folder_config(image_root))
    bundle = build_datasets(_folder_config(image_root), need_train=False)  # eval alone takes val as it is
    assert bundle.train is None and bundle.class_names == ["cat", "wolf"]


# --- Fashion-MNIST ---------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def _fake_fashion_mnist(folder: Path, train: int, test: int, compress: bool = True) -> Path:
    """The four idx files with `train`/`test` images whose pixels all equal their label."""
    for split, count in (("train", train), ("test", test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        images = np.repeat(labels, 28 * 28).reshape(count, 28, 28)
        images_name, labels_name = fashion_mnist.FILES[split]
        _write_idx(folder / images_name, images, compress)
        _write_idx(folder / labels_name, labels, compress)
    return folder


@pytest.fixture
def isolated_search(tmp_path, monkeypatch):
    """No $MOBILENETV3_DATA, an empty Debian folder and cache, and download mirrors that refuse at once."""
    from torchvision.datasets import FashionMNIST

    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.delenv("MOBILENETV3_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    return tmp_path


def _sizes(cfg: DataConfig) -> tuple[int, int]:
    bundle = build_datasets(cfg)
    return len(bundle.train), len(bundle.val)


def test_fashion_mnist_search_order(isolated_search, monkeypatch):
    tmp = isolated_search
    given = _fake_fashion_mnist(tmp / "given", 3, 2)
    env = _fake_fashion_mnist(tmp / "env" / "fashion-mnist", 5, 4).parent  # files in a fashion-mnist/ subfolder
    debian = _fake_fashion_mnist(tmp / "debian", 7, 6)
    cache = _fake_fashion_mnist(tmp / "cache" / "mobilenetv3" / "FashionMNIST" / "raw", 9, 8, compress=False)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(env))
    assert _sizes(DataConfig(dataset="fashion-mnist", data_dir=str(given))) == (3, 2)
    empty = tmp / "empty"
    empty.mkdir()
    assert _sizes(DataConfig(dataset="fashion-mnist", data_dir=str(empty))) == (5, 4)  # data_dir lacks them
    assert _sizes(DataConfig(dataset="fashion-mnist")) == (5, 4)
    monkeypatch.delenv(fashion_mnist.ENV_VAR)
    assert _sizes(DataConfig(dataset="fashion-mnist")) == (7, 6)
    shutil.rmtree(debian)
    assert _sizes(DataConfig(dataset="fashion-mnist")) == (9, 8)  # torchvision's layout in the cache
    shutil.rmtree(cache)
    with pytest.raises(UserError, match="data dir not found: .*missing"):
        build_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(tmp / "missing")))


def test_fashion_mnist_offline_download_error_is_clear(isolated_search, capsys):
    target = isolated_search / "target"
    target.mkdir()
    with pytest.raises(UserError) as error:
        build_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(target)))
    message = str(error.value)
    assert "\n" not in message
    assert f"searched {target}, {isolated_search / 'debian'}" in message
    assert f"download into {target} failed" in message and "dataset-fashion-mnist" in message


@pytest.mark.parametrize("auto_augment", [None, "autoaugment", "randaugment", "trivialaugment"])
def test_fashion_mnist_items_transforms_and_defaults(isolated_search, auto_augment):
    root = _fake_fashion_mnist(isolated_search / "fake", 20, 10)
    cfg = DataConfig(dataset="fashion-mnist", data_dir=str(root), random_erasing=0.5, auto_augment=auto_augment)
    bundle = build_datasets(cfg)
    assert bundle.model_defaults == {"in_chans": 1, "stem_stride": 1}
    assert bundle.preprocessing == Preprocessing(
        input_size=28, crop_pct=1.0, mean=fashion_mnist.MEAN, std=fashion_mnist.STD, in_chans=1
    )
    assert bundle.in_chans == 1 and bundle.class_names == fashion_mnist.CLASS_NAMES
    image, label = bundle.val[7]  # every pixel of a fake image equals its label
    expected = (7 / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
    assert label == 7 and image.shape == (1, 28, 28)
    torch.testing.assert_close(image, torch.full((1, 28, 28), expected))
    torch.manual_seed(3)
    first = torch.stack([bundle.train[i][0] for i in range(20)])
    torch.manual_seed(3)
    again = torch.stack([bundle.train[i][0] for i in range(20)])
    assert first.shape == (20, 1, 28, 28) and torch.equal(first, again)
    torch.manual_seed(3)  # a DataLoader fetches a batch at once through __getitems__
    batch = bundle.train.__getitems__(list(range(20)))
    torch.manual_seed(3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batch, bundle.train.__getitems__(list(range(20)))))
    assert [label for _, label in batch] == [i % 10 for i in range(20)]
    assert all(image.shape == (1, 28, 28) and image.dtype == torch.float32 for image, _ in batch)
    if auto_augment is None:  # (auto-augment ops such as Invert may change the padding's value)
        padding = (0 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
        assert torch.isclose(first, torch.tensor(padding)).any()  # some crops reach into the zero padding
    bigger = build_datasets(replace(cfg, input_size=32))
    assert bigger.train[0][0].shape == bigger.val[0][0].shape == (1, 32, 32)


def test_batched_pad_crop_flip_matches_v2_kernels_per_image():
    from torchvision.transforms.v2 import functional as F

    from mobilenetv3.data.transforms import RandomPadCropFlip

    images = torch.from_numpy(RNG.integers(0, 256, (64, 2, 9, 9), dtype=np.uint8))
    torch.manual_seed(0)
    crops = RandomPadCropFlip(9, padding=2, flip_p=0.5)(images)
    assert crops.shape == images.shape and crops.dtype == torch.uint8
    seen = set()
    for image, crop in zip(images, crops):
        padded = F.pad(image, [2])
        candidates = {
            (top, left, flip): F.horizontal_flip(c) if flip else c
            for top in range(5) for left in range(5) for flip in (False, True)
            for c in [F.crop(padded, top, left, 9, 9)]
        }
        matches = [key for key, candidate in candidates.items() if torch.equal(candidate, crop)]
        assert len(matches) == 1  # random pixels: exactly one (offset, flip) explains the crop
        seen.add(matches[0])
    assert len(seen) > 20 and {flip for _, _, flip in seen} == {False, True}  # a draw per image, not per batch
    for index in range(8):  # one image (sliced) and a batch of one (gathered) draw and crop the same
        torch.manual_seed(index)
        single = RandomPadCropFlip(9, padding=2, flip_p=0.5)(images[index])
        torch.manual_seed(index)
        assert torch.equal(single, RandomPadCropFlip(9, padding=2, flip_p=0.5)(images[index : index + 1])[0])


def _small_image_transform(**settings):
    from mobilenetv3.data.transforms import SmallImageTrainTransform

    prep = Preprocessing(input_size=12, crop_pct=1.0, mean=(0.3,), std=(0.4,), in_chans=1)
    return SmallImageTrainTransform(DataConfig(hflip=0.5, **settings), prep, native_size=12), prep


def test_seeded_batches_depend_only_on_each_images_seed_and_crop_like_v2():
    """The training loader's batched path: image k's crop and flip come from seeds[k] alone, whatever the batch."""
    from torchvision.transforms.v2 import functional as F

    from mobilenetv3.data.samplers import SeededSamples

    transform, prep = _small_image_transform()
    images = torch.from_numpy(RNG.integers(0, 256, (256, 1, 12, 12), dtype=np.uint8))
    seeds = [int(seed) for seed in RNG.integers(0, 2**32, 256)]
    torch_state = torch.get_rng_state()
    batch = transform.seeded(images, seeds)
    assert torch.equal(torch.get_rng_state(), torch_state)  # torch's RNG (dropout, mixup) is left alone
    assert batch.shape == (256, 1, 12, 12) and batch.dtype == torch.float32
    order = RNG.permutation(256)
    torch.testing.assert_close(transform.seeded(images[order], [seeds[k] for k in order]), batch[order], rtol=0, atol=0)
    for k in range(4):  # alone, or in a batch of one through the loader's dataset wrapper: the same image
        alone = transform.seeded(images[k : k + 1], seeds[k : k + 1])[0]
        assert torch.equal(alone, batch[k])
    dataset = SeededSamples(fashion_mnist.InMemoryImages(images, torch.arange(256) % 10, list("abcdefghij"), transform))
    assert dataset.dataset.batch_seedable
    items = dataset.__getitems__([(k, seeds[k]) for k in range(256)])
    assert all(torch.equal(image, batch[k]) and label == k % 10 for k, (image, label) in enumerate(items))
    assert torch.equal(dataset[(5, seeds[5])][0], batch[5])
    seen = set()
    for image, output in zip(images, batch):
        padded = F.pad(image, [1])  # padding round(12 / 14) = 1
        candidates = {
            (top, left, flip): F.horizontal_flip(c) if flip else c
            for top in range(3) for left in range(3) for flip in (False, True)
            for c in [F.crop(padded, top, left, 12, 12)]
        }
        normalized = {key: F.normalize(F.to_dtype(c, torch.float32, scale=True), prep.mean, prep.std)
                      for key, c in candidates.items()}
        matches = [key for key, candidate in normalized.items() if torch.equal(candidate, output)]
        assert len(matches) == 1  # random pixels: exactly one (offset, flip) explains the output
        seen.add(matches[0])
    assert len(seen) == 18  # all 3 x 3 offsets, both flips, in 256 images
    other = transform.seeded(images[:8], [seed + 1 for seed in seeds[:8]])
    assert not torch.equal(other, batch[:8])


def test_seeded_random_erasing_draws_boxes_like_torchvision():
    """Per-image erasing from seeds: one zero box per erased image, distributed as v2.RandomErasing's boxes."""
    from torchvision.transforms import v2

    from mobilenetv3.data.transforms import ERASING_ATTEMPTS, erasing_boxes

    transform, _ = _small_image_transform(random_erasing=0.5)
    images = torch.from_numpy(RNG.integers(0, 256, (400, 1, 12, 12), dtype=np.uint8))
    batch = transform.seeded(images, list(range(400)))
    zero = batch[:, 0] == 0  # no pixel normalises to exactly 0 (mean 0.3 is no multiple of 1/255): erased ones
    erased = zero.flatten(1).any(1)
    assert 160 <= int(erased.sum()) <= 240  # p = 0.5 of 400 images
    for mask in zero[erased]:  # exactly one filled rectangle each
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert int(mask.sum()) == len(rows) * len(cols)
        assert bool(mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())
    # the box distribution against torchvision's own draws, on a 28x28 image (Fashion-MNIST's size)
    erasing = v2.RandomErasing(p=1.0, value=0)
    torch.manual_seed(0)
    theirs = [erasing.make_params([torch.zeros(1, 28, 28)]) for _ in range(4000)]
    theirs = np.array([[p["i"], p["j"], p["h"], p["w"]] for p in theirs if p["v"] is not None], dtype=float)
    uniforms = np.random.default_rng(0).random((4000, 1 + 4 * ERASING_ATTEMPTS))
    ours = erasing_boxes(erasing, uniforms, 28, 28).astype(float)
    assert (ours[:, 2] > 0).mean() == pytest.approx(len(theirs) / 4000, abs=0.01)  # attempts that all fail
    ours = ours[ours[:, 2] > 0]
    for column, name in enumerate(("row", "column", "height", "width")):
        assert ours[:, column].mean() == pytest.approx(theirs[:, column].mean(), rel=0.05), name
    assert (ours[:, 2] * ours[:, 3]).mean() == pytest.approx((theirs[:, 2] * theirs[:, 3]).mean(), rel=0.05)
    assert (ours[:, :2] + ours[:, 2:] <= 28).all() and (ours[:, 2:] < 28).all()
    assert transform.seedable
    with pytest.raises(ValueError, match="auto-augment"):
        _small_image_transform(auto_augment="trivialaugment")[0].seeded(images[:2], [0, 1])


def test_fashion_mnist_corrupt_files_are_named(isolated_search):
    root = _fake_fashion_mnist(isolated_search / "fake", 4, 2)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    data = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(data[:-1]))
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\.gz is truncated or corrupt"):
        build_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(root)))
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"cannot read .*t10k-labels-idx1-ubyte\.gz"):
        build_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(root)))


def test_weights_with_other_channel_count_are_refused(isolated_search):
    root = _fake_fashion_mnist(isolated_search / "fake", 4, 2)
    with pytest.raises(UserError, match="weights expect 3-channel input but --data fashion-mnist has 1 channel"):
        build_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(root)), preprocessing=Preprocessing())


def test_read_idx_matches_torchvision_reader(tmp_path):
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    array = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "plain", array, compress=False)
    _write_idx(tmp_path / "zipped", array)
    reference = read_sn3_pascalvincent_tensor(str(tmp_path / "plain"))
    assert torch.equal(fashion_mnist.read_idx(tmp_path / "plain"), reference)
    assert torch.equal(fashion_mnist.read_idx(tmp_path / "zipped.gz"), reference)


DEBIAN_FILES = fashion_mnist.files_in(fashion_mnist.DEBIAN_DIR)


@pytest.fixture(scope="module")
def real_fashion_mnist():
    if DEBIAN_FILES is None:
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({fashion_mnist.DEBIAN_DIR} lacks the idx files)")
    return build_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(fashion_mnist.DEBIAN_DIR)))


def test_real_fashion_mnist(real_fashion_mnist):
    bundle = real_fashion_mnist
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (60000, 10000, 10)
    assert bundle.train.images.shape == (60000, 1, 28, 28) and bundle.train.images.dtype == torch.uint8
    assert torch.bincount(bundle.train.labels).tolist() == [6000] * 10
    assert torch.bincount(bundle.val.labels).tolist() == [1000] * 10
    pixels = bundle.train.images.float() / 255  # the documented normalisation constants are the data's
    assert abs(pixels.mean().item() - fashion_mnist.MEAN[0]) < 5e-5
    assert abs(pixels.std().item() - fashion_mnist.STD[0]) < 5e-5
    image, label = bundle.val[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and isinstance(label, int)


def test_real_fashion_mnist_matches_torchvision_and_predict_path(real_fashion_mnist, tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for stem, reader, ours in (
        ("t10k-images-idx3-ubyte", read_image_file, real_fashion_mnist.val.images[:, 0]),
        ("t10k-labels-idx1-ubyte", read_label_file, real_fashion_mnist.val.labels),
    ):
        with gzip.open(DEBIAN_FILES[stem], "rb") as source:
            (tmp_path / stem).write_bytes(source.read())
        assert torch.equal(reader(str(tmp_path / stem)).long(), ours.long())
    transform = real_fashion_mnist.preprocessing.eval_transform()
    for index in (0, 1234, 9999):  # a PIL image (what `predict` reads) and the tensor give the same input
        pil = Image.fromarray(real_fashion_mnist.val.images[index, 0].numpy(), mode="L")
        assert torch.equal(transform(pil), real_fashion_mnist.val[index][0])


# --- synthetic -------------------------------------------------------------------------------------------------


def test_synthetic_is_a_function_of_the_index():
    cfg = DataConfig(dataset="synthetic", input_size=SIZE, synthetic_train_samples=12, synthetic_val_samples=5,
                     synthetic_classes=4)
    bundle = build_datasets(cfg)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes, bundle.in_chans) == (12, 5, 4, 3)
    torch.manual_seed(0)
    first = bundle.train[3]
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(build_datasets(cfg).train[3][0], first[0]) and build_datasets(cfg).train[3][1] == first[1]
    assert first[0].shape == (3, SIZE, SIZE) and 0 <= first[1] < 4
    assert not torch.equal(bundle.train[4][0], first[0]) and not torch.equal(bundle.val[3][0], first[0])
    assert {bundle.train[i][1] for i in range(12)} <= set(range(4))
    with pytest.raises(IndexError):
        bundle.train[12]


def test_synthetic_batches_do_not_depend_on_workers():
    bundle = build_datasets(DataConfig(dataset="synthetic", input_size=SIZE, synthetic_train_samples=16))
    def batches(workers):
        loader = DataLoader(bundle.train, batch_size=4, num_workers=workers, collate_fn=collate_skipping)
        return [(images, targets) for images, targets, _ in loader]
    for (a_images, a_targets), (b_images, b_targets) in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)


def test_synthetic_follows_given_preprocessing_channels():
    bundle = build_datasets(DataConfig(dataset="synthetic", input_size=SIZE), preprocessing=Preprocessing(
        input_size=28, crop_pct=1.0, mean=(0.5,), std=(0.5,), in_chans=1))
    assert bundle.val[0][0].shape == (1, SIZE, SIZE) and bundle.model_defaults == {"in_chans": 1}


# --- config checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"input_size": 4}, r"data\.input_size must be >= 8, got 4"),
    ({"crop_pct": 1.5}, r"data\.crop_pct must be in \(0, 1\], got 1.5"),
    ({"interpolation": "lanczos"}, r"data\.interpolation must be one of nearest, bilinear, bicubic, got 'lanczos'"),
    ({"hflip": 2.0}, r"data\.hflip is a probability in \[0, 1\], got 2.0"),
    ({"random_erasing": -0.1}, r"data\.random_erasing is a probability in \[0, 1\], got -0.1"),
    ({"scale_min": 0.0}, r"data\.scale_min must be in \(0, 1\], got 0.0"),
    ({"auto_augment": "augmix"}, r"data\.auto_augment must be one of autoaugment, randaugment, trivialaugment or none"),
    ({"workers": -1}, r"data\.workers must be >= 0, got -1"),
    ({"synthetic_train_samples": 0}, r"data\.synthetic_train_samples must be >= 1, got 0"),
])
def test_bad_settings_are_one_line_errors(change, message):
    with pytest.raises(UserError, match=message):
        check_data_config(DataConfig(**change))
