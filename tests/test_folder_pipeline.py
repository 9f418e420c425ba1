"""The image folder's training pipeline (data/decode.py): torchvision's RandomResizedCrop distribution whichever
route decodes a file, uint8 items normalised by the loader's last step, the GPU path's plans and its CPU
fallback (run on the CPU), broken files named, batches independent of workers and resume point."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as v1

from mobilenetv3.data import DataConfig, build_datasets, collate_skipping
from mobilenetv3.data import decode
from mobilenetv3.data.decode import DeviceBatches, EncodedImage, FolderTrainTransform, jpeg_header
from mobilenetv3.data.samplers import ResumableSampler, SeededSamples
from mobilenetv3.preprocessing import IMAGENET_MEAN, IMAGENET_STD

CPU = torch.device("cpu")


def _coordinates(width: int, height: int) -> Image.Image:
    """R grows with x (0 at the left, 255 at the right), G with y, B constant: a crop's box can be read back."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def _photo(rng: np.random.Generator, width: int = 48, height: int = 36) -> Image.Image:
    """Smooth random colours (a few cells, resized up): what JPEG is made for."""
    cells = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)


def _transform(size: int, **settings) -> FolderTrainTransform:
    options = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.08, 1.0), interpolation="bilinear", hflip=0.5,
                   augment=None, erasing=0.0)
    return FolderTrainTransform(size, **{**options, **settings})


def _read_box(pixels: torch.Tensor, width: int, height: int) -> tuple[float, float, float, float, bool]:
    """(left, top, crop width, crop height, flipped) of a crop of `_coordinates(width, height)`, from the R and G
    of its interior pixels (the borders are where the resizes' filters differ)."""
    size = pixels.shape[-1]
    a, b = size // 4, 3 * size // 4
    red = pixels[0].double().mean(0) * (width - 1) / 255  # source x at each output column's centre
    green = pixels[1].double().mean(1) * (height - 1) / 255
    flipped = bool(red[b] < red[a])
    if flipped:
        red = red.flip(0)
    crop_w = float(red[b] - red[a]) * size / (b - a)
    crop_h = float(green[b] - green[a]) * size / (b - a)
    left = float(red[a]) - (a + 0.5) * crop_w / size + 0.5
    top = float(green[a]) - (a + 0.5) * crop_h / size + 0.5
    return left, top, crop_w, crop_h, flipped


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda sample: np.searchsorted(np.sort(sample), grid, side="right") / len(sample)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize("width, height, size, route", [
    (96, 72, 48, "decode_jpeg"),  # every crop under 2x the output: libjpeg-turbo, full size
    (640, 480, 24, "draft"),  # crops of 2x-8x the output: PIL decodes at 1/2 to 1/8 scale
])
def test_crops_follow_torchvision_random_resized_crop(tmp_path, width, height, size, route):
    path = tmp_path / "coordinates.jpg"
    _coordinates(width, height).save(path, quality=100, subsampling=0)
    transform, draws = _transform(size), 300
    whole = torch.empty(3, height, width)
    factors, ours, theirs, flips = [], [], [], 0
    for seed in range(draws):
        torch.manual_seed(seed)
        left, top, crop_w, crop_h, flipped = _read_box(transform(str(path)), width, height)
        torch.manual_seed(seed)  # the same seed: torchvision's own draw of this sample's crop
        i, j, h, w = v1.RandomResizedCrop.get_params(whole, [0.08, 1.0], [3 / 4, 4 / 3])
        factors.append(decode.draft_factor(decode.CropPlan(i, j, h, w, False, None), size))
        # each crop where torchvision puts it, to the resolution the 8-bit coordinates allow
        pixel = max(width, height) / 255
        assert abs(left - j) <= 1 + 2 * pixel and abs(top - i) <= 1 + 2 * pixel, (seed, (left, top), (j, i))
        assert abs(crop_w - w) <= 1 + 0.03 * w + 2 * pixel and abs(crop_h - h) <= 1 + 0.03 * h + 2 * pixel, seed
        ours.append((crop_w * crop_h / (width * height), np.log(crop_w / crop_h), (left + crop_w / 2) / width))
        flips += flipped
    torch.manual_seed(12345)  # and as a distribution, against independent draws of torchvision's
    for _ in range(draws):
        i, j, h, w = v1.RandomResizedCrop.get_params(whole, [0.08, 1.0], [3 / 4, 4 / 3])
        theirs.append((h * w / (width * height), np.log(w / h), (j + w / 2) / width))
    ours, theirs = np.array(ours), np.array(theirs)
    critical = 1.95 * np.sqrt(2 / draws)  # two-sample KS at alpha = 0.001
    for column, name in enumerate(("area", "log aspect", "centre x")):
        assert _ks(ours[:, column], theirs[:, column]) < critical, name
    assert abs(flips / draws - 0.5) < 4 * np.sqrt(0.25 / draws)  # p = 0.5
    assert (max(factors) > 1) == (route == "draft") and (route != "draft" or np.mean(np.array(factors) > 1) > 0.9)


def test_jpeg_header_reads_the_frame_header(tmp_path):
    image = _photo(np.random.default_rng(0), 37, 23)
    for name, options in (("baseline.jpg", {}), ("progressive.jpg", {"progressive": True}),
                          ("exif.jpg", {"exif": Image.Exif().tobytes() + b"x" * 300})):
        image.save(tmp_path / name, **options)
        assert jpeg_header((tmp_path / name).read_bytes()) == (37, 23, 3), name
    image.convert("L").save(tmp_path / "grey.jpg")
    image.convert("CMYK").save(tmp_path / "cmyk.jpg")
    image.save(tmp_path / "image.png")
    assert jpeg_header((tmp_path / "grey.jpg").read_bytes()) == (37, 23, 1)
    assert jpeg_header((tmp_path / "cmyk.jpg").read_bytes()) == (37, 23, 4)
    assert jpeg_header((tmp_path / "image.png").read_bytes()) is None
    assert jpeg_header(b"") is None and jpeg_header((tmp_path / "grey.jpg").read_bytes()[:12]) is None


@pytest.fixture
def photo_root(tmp_path: Path) -> Path:
    """train/{a,b} of small photo-like JPEGs, plus a PNG, a CMYK JPEG and a truncated JPEG in train/a."""
    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    for split, count in (("train", 6), ("val", 1)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for index in range(count):
                _photo(rng).save(root / split / label / f"{index}.jpg", quality=90)
    _photo(rng).save(root / "train" / "a" / "lossless.png")
    _photo(rng).convert("CMYK").save(root / "train" / "a" / "cmyk.jpg")
    whole = (root / "train" / "a" / "0.jpg").read_bytes()
    (root / "train" / "a" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # its header is whole
    return root


#: the photos' crop size: over half their height, so no crop is decoded at reduced scale (`draft_factor` 1) and the
#: CPU path decodes every JPEG as the device path does
SIZE = 24


def _names(folder) -> list[str]:
    """"<class>/<file>" of each sample, in sample order."""
    return [f"{Path(path).parent.name}/{Path(path).name}" for path, _ in folder.samples]


def _config(root: Path, **changes) -> DataConfig:
    return DataConfig(dataset=str(root), input_size=SIZE, **changes)


def _batches(bundle, keys, *, workers: int = 0, device=CPU) -> list:
    """The training batches of sampler `keys`, 4 at a time, finished as the training loader finishes them."""
    loader = DataLoader(SeededSamples(bundle.train), batch_size=4, sampler=keys, num_workers=workers,
                        collate_fn=collate_skipping)
    return list(DeviceBatches(loader, bundle.finish_train_batch, device))


def test_items_are_uint8_and_batches_are_normalised_on_the_device(photo_root):
    bundle = build_datasets(_config(photo_root))
    image, label = bundle.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and label == 0
    keys = [(index, index) for index in range(4)]
    images, targets, skipped = _batches(bundle, keys)[0]
    assert images.dtype == torch.float32 and images.shape == (4, 3, SIZE, SIZE) and skipped == 0
    # each item's pixels, normalised as torchvision's Normalize would
    pixels = torch.stack([SeededSamples(bundle.train)[key][0] for key in keys])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(images, (pixels.float() / 255 - mean) / std, rtol=0, atol=1e-5)


def test_training_batches_do_not_depend_on_workers_or_resume_point(photo_root):
    bundle = build_datasets(_config(photo_root, auto_augment="randaugment", random_erasing=0.5))
    sampler = ResumableSampler(bundle.train, seed=3)
    sampler.set_position(epoch=1)
    whole = _batches(bundle, list(sampler))
    again = _batches(bundle, list(sampler), workers=2)
    sampler.set_position(epoch=1, start=4)  # resumed after the first batch
    resumed = _batches(bundle, list(sampler))
    for (a, ta, sa), (b, tb, sb) in zip(whole, again, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb) and sa == sb
    for (a, ta, _), (b, tb, _) in zip(whole[1:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    sampler.set_position(epoch=2)
    assert not torch.equal(_batches(bundle, list(sampler))[0][0], whole[0][0])


def test_every_mode_and_route_and_broken_files_are_named(photo_root, caplog):
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    bundle = build_datasets(_config(photo_root))
    names = _names(bundle.train)
    items = {name: bundle.train[index] for index, name in enumerate(names)}
    assert items["a/truncated.jpg"] is None
    warned = [r.getMessage() for r in caplog.records if "truncated.jpg" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(
        f"skipping unreadable image {photo_root / 'train' / 'a' / 'truncated.jpg'}: ")
    assert "truncated" in warned[0].split(": ", 1)[1].lower()
    for name in ("a/lossless.png", "a/cmyk.jpg", "a/0.jpg", "b/0.jpg"):
        image, label = items[name]
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE), name
        assert label == "ab".index(name[0])


def test_erasing_fills_with_the_pixel_that_normalises_to_zero(tmp_path):
    path = tmp_path / "photo.jpg"
    _photo(np.random.default_rng(2)).save(path, quality=95)
    transform = _transform(16, erasing=1.0, hflip=0.0)
    torch.manual_seed(0)
    erased = transform(str(path))
    fill = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8).view(3, 1, 1)
    assert (erased == fill).all(0).sum() >= 0.02 * 16 * 16  # torchvision's smallest erased area
    normalised = transform.normalize(fill[None].expand(1, 3, 2, 2))
    assert normalised.abs().max() < 0.01


def test_gpu_path_items_carry_the_cpu_paths_plans_and_give_its_pixels(photo_root):
    """`data.decode: gpu` run on the CPU: the worker hands over bytes and the plan the CPU path draws, and
    finishing the batch (decode_jpeg on the given device, the plan applied there) gives the CPU path's batch."""
    settings = dict(auto_augment="trivialaugment", random_erasing=0.5)
    cpu = build_datasets(_config(photo_root, **settings))
    gpu = build_datasets(_config(photo_root, decode="gpu", **settings))
    names = _names(gpu.train)
    keys = [(index, 100 + index) for index, name in enumerate(names) if name != "a/truncated.jpg"]
    items = SeededSamples(gpu.train).__getitems__(keys)
    kinds = {names[index]: type(item[0]) for (index, _), item in zip(keys, items)}
    assert kinds["a/0.jpg"] is EncodedImage  # the PNG and the CMYK JPEG are decoded in the worker
    assert kinds["a/lossless.png"] is torch.Tensor and kinds["a/cmyk.jpg"] is torch.Tensor
    for (index, seed), item in zip(keys, items):
        if isinstance(item[0], EncodedImage):
            torch.manual_seed(seed)
            header = jpeg_header(item[0].data.numpy().tobytes())
            assert item[0].plan == cpu.train.transform.plan(header[0], header[1])
    for (a, ta, sa), (b, tb, sb) in zip(_batches(cpu, keys), _batches(gpu, keys), strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb) and sa == sb == 0
    images, targets, _ = collate_skipping(items[:4])
    before = torch.get_rng_state()
    gpu.finish_train_batch(images, targets, CPU)  # keeps the caller's RNG (the plans reseed it)
    assert torch.equal(torch.get_rng_state(), before)


def test_gpu_path_falls_back_to_the_cpu_path_and_names_what_fails_there(photo_root, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    cpu = build_datasets(_config(photo_root))
    gpu = build_datasets(_config(photo_root, decode="gpu"))
    names = _names(gpu.train)
    keys = [(index, index) for index in range(len(names))]
    expected = _batches(cpu, keys)
    caplog.clear()
    monkeypatch.setattr(decode, "_decode_jpegs", lambda datas, mode, device: [None] * len(datas))  # device refuses
    for (a, ta, sa), (b, tb, sb) in zip(expected, _batches(gpu, keys), strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb) and sa == sb
    assert sum(skipped for _, _, skipped in expected) == 1
    truncated = str(photo_root / "train" / "a" / "truncated.jpg")
    assert sum(truncated in r.getMessage() for r in caplog.records) == 1  # named once, by the CPU path
    monkeypatch.undo()
    # the real decoder on a batch with the truncated file: the others still decoded, that one named and dropped
    index = names.index("a/truncated.jpg")
    items = SeededSamples(gpu.train).__getitems__([(index, 0), (0, 0)])
    assert isinstance(items[0][0], EncodedImage)
    images, targets, dropped = gpu.finish_train_batch(*collate_skipping(items)[:2], CPU)
    assert images.shape == (1, 3, SIZE, SIZE) and targets.tolist() == [0] and dropped == 1


def test_bad_decode_setting_is_a_one_line_error(photo_root):
    from mobilenetv3 import UserError

    with pytest.raises(UserError, match=r"data\.decode must be one of cpu, gpu, got 'tpu'"):
        build_datasets(_config(photo_root, decode="tpu"))


def test_bench_loader_times_the_training_batches_and_ends_with_json(photo_root, capsys):
    from mobilenetv3.cli import main

    assert main(["bench-loader", "--data", str(photo_root), "--batch-size", "4", "--batches", "3", "--workers", "0",
                 "--input-size", str(SIZE), "--device", "cpu", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert list(result)[:3] == ["images_per_s", "workers", "batch_size"]
    assert result["images_per_s"] > 0 and result["workers"] == 0 and result["batch_size"] == 4
    assert result["images"] + result["skipped"] == 12 and result["input_size"] == SIZE
    assert lines[0].startswith("bench-loader: ") and "images/s" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["--batches", "0"], "--batches must be >= 1, got 0"),
    (["--set", "data.decode=gpu"], "data.decode=gpu decodes JPEGs on a CUDA device, and this run's device is cpu"),
    (["--batch-size", "1000"], "gives no full batch of 1000"),
])
def test_bench_loader_mistakes_are_one_line(photo_root, capsys, args, message):
    from mobilenetv3.cli import main

    assert main(["bench-loader", "--data", str(photo_root), "--workers", "0", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_normalize_pixels_is_torchvisions_normalize_in_either_layout(layout):
    from torchvision.transforms import v2

    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8).contiguous(memory_format=layout)
    expected = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(pixels))
    got = decode.normalize_pixels(pixels, IMAGENET_MEAN, IMAGENET_STD)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=layout)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("recipe", ["imagenet-seed", "imagenet-paper", "imagenet-timm", "imagenet-torchvision"])
def test_every_imagenet_recipes_augmentation_runs_on_the_folder_pipeline(photo_root, recipe):
    """Their interpolation (timm's bicubic), auto-augment and erasing, on every item (none is lost)."""
    from dataclasses import asdict

    from mobilenetv3.train.config import load_config

    data = asdict(load_config(recipe).data)
    bundle = build_datasets(DataConfig(**{**data, "dataset": str(photo_root), "input_size": SIZE}))
    names = _names(bundle.train)
    batches = _batches(bundle, [(index, index) for index, name in enumerate(names) if name != "a/truncated.jpg"])
    assert sum(len(images) for images, _, _ in batches) == len(names) - 1
    assert all(skipped == 0 and images.dtype == torch.float32 for images, _, skipped in batches)


def test_an_augmentation_error_is_raised_not_taken_for_a_broken_file(photo_root, monkeypatch):
    bundle = build_datasets(_config(photo_root, auto_augment="randaugment"))

    def broken(image):
        raise ValueError("a bug in an augmentation")

    monkeypatch.setattr(bundle.train.transform, "augment", broken)
    with pytest.raises(ValueError, match="a bug in an augmentation"):
        bundle.train[0]
    assert not bundle.train.broken_files


def test_data_decode_gpu_is_refused_for_data_without_jpegs(capsys):
    from mobilenetv3.cli import main

    assert main(["bench-loader", "--data", "synthetic", "--workers", "0", "--device", "cpu",
                 "--set", "data.decode=gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.decode=gpu decodes an image folder's JPEGs; 'synthetic' has none" in err
    assert len(err.splitlines()) == 1


def test_resuming_a_checkpoint_of_the_earlier_pil_pipeline_warns_that_it_is_not_exact(photo_root, tmp_path, caplog):
    """A checkpoint without `sampler.folder_pipeline` (written before issue 27) resumes, with one warning: the
    crops and augmentations drawn from here on are not those of the pipeline that wrote it."""
    import logging

    from mobilenetv3.cli import main
    from mobilenetv3.train.checkpoint import FOLDER_PIPELINE_VERSION

    output = tmp_path / "run"
    common = ["--data", str(photo_root), "--input-size", str(SIZE), "--workers", "0", "--batch-size", "4",
              "--model", "mobilenetv3_small_035", "--no-progress", "--set", "threads=1"]
    assert main(["train", *common, "--epochs", "1", "--output", str(output)]) == 0
    last = output / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    assert payload["sampler"]["folder_pipeline"] == FOLDER_PIPELINE_VERSION
    del payload["sampler"]["folder_pipeline"]
    torch.save(payload, last)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["train", *common, "--epochs", "2", "--output", str(output), "--resume"]) == 0
    warned = [r.getMessage() for r in caplog.records if "earlier image-folder pipeline" in r.getMessage()]
    assert len(warned) == 1 and "the PIL one" in warned[0] and "not an exact resume" in warned[0]
